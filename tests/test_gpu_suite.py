"""The GPU benchmark suite's CPU mode (`benchmarks/gpu_suite.py --small`): it runs end to end, and what it
reports holds against independent oracles (stock `generate`'s tokens, hand-computed attention and KV sizes,
exact batching in float32), so the script cannot rot before a GPU runs it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_suite.py"
PARTS = ["engine", "interventions", "capture", "pope", "chair", "opera"]


def load_suite(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the suite imports its sibling scripts
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def rows_of(payload, part):
    return [r for r in payload["rows"] if r["part"] == part]


def test_small_mode_runs_every_part_and_prints_one_table(small_run):
    payload, stdout = small_run
    assert [p for p in payload["parts"] if p != "build"] == PARTS
    assert all(p["status"] == "ok" for p in payload["parts"].values()), payload["parts"]
    assert all(p["wall_seconds"] > 0 for p in payload["parts"].values())
    for row in payload["rows"]:
        assert row["value"] > 0 and row["baseline"] > 0, row
        assert math.isclose(row["ratio"], row["value"] / row["baseline"], rel_tol=1e-12)
        assert row["figure"] in stdout  # the printed table has every figure of the JSON
    assert stdout.count("part ") == 1 and "wall time:" in stdout
    readme = payload["readme_markdown"].splitlines()  # the block that goes into the README's GPU section
    assert readme[0].startswith("Measured 20") and "CPU" in readme[0]
    assert len(readme) == 4 + len(payload["rows"])
    for row, line in zip(payload["rows"], readme[4:]):
        assert line.startswith(f"| {row['part']} | {row['figure']} | ") and line.endswith(f" | {row['ratio']:.2f}x |")
    record = payload["provenance"]
    assert record["versions"]["torch"] and record["dtype"] == "float32" and record["device"] == "cpu"
    assert record["suite"] == "small" and record["image_tokens"] == 64
    assert {s.split(":")[0] for s in record["interventions"]} == {"pai", "aai", "vcd", "fastv", "truncate"}


def test_engine_and_capture_decode_the_same_tokens_as_stock_generate(small_run):
    payload, _ = small_run
    (engine,) = rows_of(payload, "engine")
    assert engine["details"]["same_tokens_as_stock"] is True  # float32: the idle engine is stock SDPA
    for row in rows_of(payload, "capture"):
        assert row["details"]["same_tokens_as_stock"] is True


def test_capture_keeps_what_a_hand_count_says(small_run):
    payload, _ = small_run
    size, record = payload["size"], payload["provenance"]
    heads, layers = size["text"]["num_attention_heads"], size["text"]["num_hidden_layers"]
    n, image, prompt = size["capture_tokens"], record["image_tokens"], record["prompt_tokens"]
    details = rows_of(payload, "capture")[0]["details"]
    # ours: one layer, every head, one query row per generated token, image columns only
    assert details["attention_values_kept"] == n * heads * image
    # stock: every layer and head, the prefill's square plus one row per decode step over the growing cache
    assert details["stock_attention_values_kept"] == layers * heads * (prompt**2 + sum(prompt + k for k in range(1, n)))
    assert {r["unit"] for r in rows_of(payload, "capture")} == {"s", "MiB"}


def test_fastv_kv_cache_and_opera_rows(small_run):
    payload, _ = small_run
    size, record = payload["size"], payload["provenance"]
    layers, n = size["text"]["num_hidden_layers"], size["intervention_tokens"]
    tokens = record["prompt_tokens"] + n - 1  # cached positions after n tokens (the last is never fed back)
    dropped = record["image_tokens"] - round(record["image_tokens"] * (1 - 0.5))  # fastv defaults k=2, ratio 0.5
    (kv,) = [r for r in rows_of(payload, "interventions") if r["unit"] == "MiB"]
    assert kv["ratio"] == pytest.approx((2 * tokens + (layers - 2) * (tokens - dropped)) / (layers * tokens))
    methods = [r["figure"].split(": ")[1].split(" ")[0] for r in rows_of(payload, "interventions") if r["unit"] == "s"]
    assert methods == ["pai", "aai", "vcd", "fastv", "truncate:layer=2"]
    opera = rows_of(payload, "opera")
    assert [r["unit"] for r in opera] == ["s", "MiB"] * len(size["opera_tokens"])
    for row in opera:
        assert row["details"]["spec"].startswith("opera:num_beams=5,scale_factor=50.0,threshold=15")
        assert row["details"]["decoding_steps"] >= row["details"]["new_tokens"]


def test_pope_and_chair_batches_answer_like_one_by_one(small_run):
    payload, _ = small_run
    size = payload["size"]
    pope = rows_of(payload, "pope")
    questions = size["pope_images"] * size["pope_per_image"]
    assert [r["details"]["batch_size"] for r in pope] == size["pope_batches"]
    for row in pope:  # left padding is exact in float32: batching changes no answer
        assert row["details"]["answers_equal_to_one_by_one"] == row["details"]["questions"] == questions
    (chair,) = rows_of(payload, "chair")
    assert chair["unit"] == "1/s" and chair["details"]["captions"] == size["chair_batch"]
    assert chair["details"]["new_tokens"] == size["chair_tokens"]


def test_bad_arguments_exit_2_and_write_nothing(monkeypatch, tmp_path, capsys):
    suite = load_suite(monkeypatch)
    out = tmp_path / "suite.json"
    assert suite.main(["--small", "--parts", "engine,bogus", "--out", str(out)]) == 2
    assert suite.main(["--small", "--out", str(tmp_path / "missing" / "x.json")]) == 2
    assert suite.main(["--small", "--out", str(tmp_path)]) == 2
    assert suite.main(["--small", "--repeats", "0"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    assert "bogus" in lines[0] and "does not exist" in lines[1] and "directory" in lines[2]
    assert captured.out == "" and not out.exists() and list(tmp_path.iterdir()) == []


def test_without_cuda_the_full_mode_names_the_cpu_mode(monkeypatch, capsys):
    import torch

    suite = load_suite(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert suite.main([]) == 2
    assert "--small" in capsys.readouterr().err


def test_a_failing_part_is_recorded_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    suite = load_suite(monkeypatch)

    def broken(ctx):
        raise RuntimeError("out of memory, say")

    def fine(ctx):
        return [suite.Row("engine", "a figure", 2.0, 4.0, "s")]

    monkeypatch.setitem(suite.PARTS, "engine", broken)
    monkeypatch.setitem(suite.PARTS, "opera", fine)
    out = tmp_path / "suite.json"
    assert suite.main(["--small", "--parts", "engine,opera", "--out", str(out)]) == 1
    payload = json.loads(out.read_text())
    assert payload["parts"]["engine"]["status"] == "failed: RuntimeError: out of memory, say"
    assert payload["parts"]["opera"]["status"] == "ok"
    assert [r["ratio"] for r in payload["rows"]] == [0.5]
    assert "a figure" in capsys.readouterr().out


def test_no_part_starts_after_the_time_budget(monkeypatch, tmp_path):
    suite = load_suite(monkeypatch)
    out = tmp_path / "suite.json"
    assert suite.main(["--small", "--parts", "engine,chair", "--budget-seconds", "0", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["rows"] == []
    assert all(payload["parts"][p]["status"].startswith("skipped") for p in ("engine", "chair"))


def test_full_mode_builds_llava_1_5_7b_shapes(monkeypatch):
    import torch

    suite = load_suite(monkeypatch)
    from bench_common import build_llava_vlm

    size = suite._full()
    assert (size.dtype, size.device, size.beams, size.chair_tokens, size.pope_batches) == (
        "bfloat16", "cuda", 5, 512, (8, 32))
    # On the meta device: shapes without memory. The oracle: llava-hf/llava-1.5-7b-hf has 7,063,427,072
    # parameters (Vicuna-7B with 32064 tokens, CLIP ViT-L/14-336, the two-layer projector).
    vlm = build_llava_vlm(size.text, size.vision, device="meta", dtype=torch.bfloat16, scale=size.scale,
                          image_size=size.image_size, patch_size=size.patch_size, fixed_length=True)
    assert sum(p.numel() for p in vlm.model.parameters()) == 7_063_427_072
    assert vlm.model.config.image_seq_length == 576 and vlm.dtype == torch.bfloat16
    assert vlm.adapter.num_layers == 32 and size.capture_layer < 32
    assert vlm.model.generation_config.eos_token_id == []  # fixed token counts: no EOS


def test_opera_starts_no_longer_search_after_the_deadline(monkeypatch):
    import dataclasses

    suite = load_suite(monkeypatch)
    size = dataclasses.replace(suite._small(), opera_tokens=(5, 7))
    ctx = suite.build_context(size, repeats=1)
    ctx.deadline = 0.0  # already passed: the first length still runs, so that the part has a figure
    rows = suite.part_opera(ctx)
    assert [r["new_tokens"] for r in (row.details for row in rows)] == [5, 5]
    assert ctx.notes == ["7 tokens skipped (time budget)"]
    assert rows[0].value > 0 and rows[1].unit == "MiB"
