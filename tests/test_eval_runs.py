"""Evaluation runners: seed-flag translation, resumable stores (no duplicates after a kill)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from vlmscope.eval.results import JsonlResults, merge, shard
from vlmscope.eval.seed_flags import add_seed_flags, method_specs


def parse(argv):
    parser = argparse.ArgumentParser()
    add_seed_flags(parser)
    return parser.parse_args(["--data-path", "x", *argv])


@pytest.mark.parametrize("argv, decoding, interventions", [
    ([], "greedy", []),
    (["--beam", "5"], "beam:num_beams=5", []),
    (["--beam", "5", "--scale_factor", "50", "--threshold", "15"], "opera:num_beams=5,scale_factor=50.0,threshold=15", []),
    (["--use-attn", "--alpha", "0.5"], "greedy", ["pai:alpha=0.5,start=2,end=32"]),
    (["--use-attn", "--use-cfg", "--gamma", "1.1"], "greedy", ["pai:alpha=0.2,start=2,end=32,cfg=true,gamma=1.1"]),
    (["--use-aai", "--start-layer", "3"], "greedy", ["aai:alpha=0.3,beta=1.0,start=3,end=32"]),
])
def test_seed_flags(argv, decoding, interventions):
    assert method_specs(parse(argv)) == (decoding, interventions)


def test_store_resumes_without_duplicates(tmp_path):
    path = tmp_path / "captions.jsonl"
    store = JsonlResults(path, "image_id")
    store.append([{"image_id": 1, "caption": "a"}, {"image_id": 2, "caption": "b"}])
    with open(path, "a") as f:  # a writer killed mid-line
        f.write('{"image_id": 3, "capt')
    store = JsonlResults(path, "image_id")
    assert store.done() == {1, 2}
    store.append([{"image_id": 2, "caption": "again"}, {"image_id": 3, "caption": "c"}])
    rows = list(JsonlResults(path, "image_id").rows())
    assert [r["image_id"] for r in rows] == [1, 2, 3] and rows[1]["caption"] == "b"


def test_killed_writer_then_restart_gives_exactly_n_rows(tmp_path):
    """SIGKILL a process that appends rows slowly, restart it, and count unique rows."""
    path = tmp_path / "rows.jsonl"
    script = textwrap.dedent(f"""
        import time, sys
        from vlmscope.eval.results import JsonlResults
        store = JsonlResults({str(path)!r}, "question_id")
        for i in range(40):
            if i not in store.done():
                store.append([{{"question_id": i, "answer": "yes " * 200}}])
                time.sleep(0.01)
        print("done")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    import time

    deadline = time.time() + 30
    while (not path.exists() or path.stat().st_size < 5000) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert "done" in out.stdout
    ids = [r["question_id"] for r in JsonlResults(path, "question_id").rows()]
    assert sorted(ids) == list(range(40)) and len(ids) == 40


def test_shard_and_merge(tmp_path):
    items = list(range(10))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    paths = []
    for rank, part in enumerate(parts):
        p = tmp_path / f"rank{rank}.jsonl"
        JsonlResults(p, "image_id").append({"image_id": i} for i in part)
        paths.append(p)
    merge(paths, tmp_path / "all.jsonl", "image_id")
    merge(paths, tmp_path / "all.jsonl", "image_id")  # merging twice adds nothing
    assert sorted(r["image_id"] for r in JsonlResults(tmp_path / "all.jsonl", "image_id").rows()) == items


def test_eval_end_to_end_on_tiny_model_resumes(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from vlmscope.cli import main

    data = tmp_path / "coco"
    data.mkdir()
    ids = [139, 285, 632]
    for i in ids:
        Image.fromarray((np.random.default_rng(i).random((40, 48, 3)) * 255).astype("uint8")).save(
            data / f"COCO_val2014_{i:012d}.jpg")
    questions = data / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": k, "image": f"COCO_val2014_{i:012d}.jpg",
                                             "text": "is there a cat in the image ?",
                                             "label": "yes" if k % 2 else "no"}) + "\n"
                                 for k, i in enumerate(ids)))
    out = tmp_path / "run"
    argv = ["eval", "chair", "--model", "tiny-llava", "--data-path", str(data), "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "2", "--prompt", "describe this image ."]
    assert main(argv) == 0
    first = (out / "captions.jsonl").read_text()
    assert main(argv) == 0  # a restart finds everything done and writes nothing new
    assert (out / "captions.jsonl").read_text() == first and len(first.splitlines()) == 3
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"CHAIR_S", "CHAIR_I", "Recall", "Len", "Precision", "F1"}
    pope_out = tmp_path / "pope"
    assert main(["eval", "pope", "--model", "tiny-llava", "--data-path", str(data), "--out", str(pope_out),
                 "--questions", str(questions), "--max-new-tokens", "2"]) == 0
    assert len((pope_out / "answers.jsonl").read_text().splitlines()) == 3
    assert (pope_out / "metrics.md").is_file()


@pytest.mark.parametrize("argv", [["--use-attn"], ["--use-attn", "--use-cfg"], ["--use-aai"], ["--use-cfg"]])
def test_seed_specs_parse_with_the_real_registry(argv):
    from vlmscope.interventions import INTERVENTIONS

    _, interventions = method_specs(parse(argv))
    for spec in interventions:
        INTERVENTIONS.parse(spec)


def test_configs_name_registered_methods():
    from pathlib import Path

    import yaml

    from vlmscope.decoding import DECODINGS
    from vlmscope.interventions import INTERVENTIONS

    for path in Path(__file__).resolve().parents[1].glob("eval_configs/*.yaml"):
        config = yaml.safe_load(path.read_text())
        for name, params in (config.get("methods") or {}).items():
            registry = DECODINGS if name in DECODINGS.names() or name == "opera" else INTERVENTIONS
            if name in registry.names():
                registry.create(name, params)
