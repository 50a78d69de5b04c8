"""Evaluation runs through the CLI: seed-flag translation, resumption, sharded runs (store internals: test_store.py)."""

from __future__ import annotations

import argparse
import json

import pytest

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


def _coco_dir(tmp_path, ids=(139, 285, 632, 724, 776)):
    import numpy as np
    from PIL import Image

    data = tmp_path / "coco"
    data.mkdir()
    for i in ids:
        Image.fromarray((np.random.default_rng(i).random((40, 48, 3)) * 255).astype("uint8")).save(
            data / f"COCO_val2014_{i:012d}.jpg")
    return data, list(ids)


def _questions(path, ids, split):
    path.write_text("".join(json.dumps({"question_id": k + 1, "image": f"COCO_val2014_{i:012d}.jpg",
                                        "text": "is there a cat in the image ?",
                                        "label": "yes" if k % 2 else "no"}) + "\n"
                            for k, i in enumerate(ids)))
    return path


def _stock_greedy_text(image_path, prompt, max_new):
    """Oracle: stock `generate` of the same tiny model on one image, decoded the same way."""
    from PIL import Image

    import vlmscope

    vlm = vlmscope.load("tiny-llava")
    batch = vlm.encode([Image.open(image_path)], [prompt])
    out = vlm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs,
                             do_sample=False, max_new_tokens=max_new)
    return vlm.adapter.tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True).strip()


def test_eval_end_to_end_on_tiny_model_resumes(tmp_path):
    from vlmscope.cli import main

    data, ids = _coco_dir(tmp_path, (139, 285, 632))
    out = tmp_path / "run"
    argv = ["eval", "chair", "--model", "tiny-llava", "--data-path", str(data), "--out", str(out),
            "--max-new-tokens", "4", "--batch-size", "2", "--prompt", "describe this image ."]
    assert main(argv) == 0
    first = (out / "captions.jsonl").read_text()
    assert main(argv) == 0  # a restart finds everything done and writes nothing new
    assert (out / "captions.jsonl").read_text() == first and len(first.splitlines()) == 3
    rows = [json.loads(line) for line in first.splitlines()]
    # Batched captions equal stock generate on each image alone.
    row = rows[0]
    assert row["caption"] == _stock_greedy_text(row["image"], "describe this image .", 4)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"CHAIR_S", "CHAIR_I", "Recall", "Len", "Precision", "F1"}
    details = json.loads((out / "chair_details.json").read_text())
    assert details  # per-caption details are written beside the metrics
    pope_out = tmp_path / "pope"
    questions = _questions(data / "q.jsonl", ids, "random")
    assert main(["eval", "pope", "--model", "tiny-llava", "--data-path", str(data), "--out", str(pope_out),
                 "--questions", str(questions), "--max-new-tokens", "2"]) == 0
    assert len((pope_out / "answers.jsonl").read_text().splitlines()) == 3
    assert (pope_out / "metrics.md").is_file()


def test_sharded_run_merges_every_row_once(tmp_path, monkeypatch):
    """Two processes under accelerate, simulated one after the other: rank 1 first, then rank 0 merges.
    The merged result equals a single-process run, row for row, and a restart adds nothing."""
    import vlmscope.eval.model_eval as model_eval
    from vlmscope.cli import main

    data, ids = _coco_dir(tmp_path)
    random_q = _questions(tmp_path / "coco_pope_random.jsonl", ids, "random")
    popular_q = _questions(tmp_path / "coco_pope_popular.jsonl", ids[::-1], "popular")

    def argv(task, out):
        common = ["--model", "tiny-llava", "--data-path", str(data), "--out", str(out), "--max-new-tokens", "3",
                  "--batch-size", "2"]
        if task == "chair":
            return ["eval", "chair", *common, "--num-images", "4", "--seed", "42"]
        return ["eval", "pope", *common, "--questions", str(random_q), str(popular_q)]

    for task, name in (("chair", "captions.jsonl"), ("pope", "answers.jsonl")):
        single = tmp_path / f"{task}-single"
        monkeypatch.setattr(model_eval, "current_shard", lambda: model_eval.Shard())
        assert main(argv(task, single)) == 0
        sharded = tmp_path / f"{task}-sharded"
        for rank in (1, 0):
            monkeypatch.setattr(model_eval, "current_shard", lambda rank=rank: model_eval.Shard(rank, 2))
            assert main(argv(task, sharded)) == 0
        assert main(argv(task, sharded)) == 0  # restart as rank 0: nothing new
        merged = [json.loads(line) for line in (sharded / name).read_text().splitlines()]
        alone = [json.loads(line) for line in (single / name).read_text().splitlines()]
        key = "image_id" if task == "chair" else "qkey"
        assert [r[key] for r in merged] == [r[key] for r in alone]  # item order, each once
        assert merged == alone
        m1 = json.loads((sharded / "metrics.json").read_text())["metrics"]
        m2 = json.loads((single / "metrics.json").read_text())["metrics"]
        assert m1 == m2
    pope_metrics = json.loads((tmp_path / "pope-single" / "metrics.json").read_text())
    assert set(pope_metrics["splits"]) == {"random", "popular"}


@pytest.mark.parametrize("extra, message", [
    (["--questions", "missing.jsonl"], "not found"),
    ([], "--questions"),
])
def test_pope_input_errors_exit_2_before_loading(tmp_path, capsys, extra, message):
    from vlmscope.cli import main

    data, _ = _coco_dir(tmp_path, (139,))
    code = main(["eval", "pope", "--model", "no-such-model", "--data-path", str(data), "--out",
                 str(tmp_path / "o"), *extra])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


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
