"""Evaluation runs through the CLI: seed-flag translation, resumption, sharded runs (store internals: test_store.py)."""

from __future__ import annotations

import argparse
import json

import pytest
from stock_oracles import stock_greedy_text

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
    (["--use-attn", "--use-cfg", "--gamma", "1.1"], "greedy", ["pai:alpha=0.2,start=2,end=32,cfg=true,gamma=1.1,"
                                                                      "cfg_reorder_uncond_cache=false,cfg_beam_raw_scores=true"]),
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
    assert row["caption"] == stock_greedy_text(row["image"], "describe this image .", 4)
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


# --- run folders bound to their settings (issue 12) -------------------------------------------------------------

def _chair_argv(data, out, *extra):
    return ["eval", "chair", "--model", "tiny-llava", "--data-path", str(data), "--out", str(out),
            "--max-new-tokens", "3", "--batch-size", "2", "--prompt", "describe this image .", *extra]


@pytest.fixture(scope="module")
def greedy_run(tmp_path_factory):
    """One finished 3-image greedy CHAIR run (tiny model), shared by the tests below (which copy it)."""
    from vlmscope.cli import main

    root = tmp_path_factory.mktemp("greedy")
    data, _ = _coco_dir(root, (139, 285, 632))
    out = root / "run"
    assert main(_chair_argv(data, out)) == 0
    return data, out


def _copy(run, tmp_path):
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra, key", [
    (["--decoding", "sample:temperature=5"], "decoding"),
    (["--decoding", "beam:num_beams=2"], "decoding"),
    (["--intervention", "pai:alpha=0.5"], "interventions"),
    (["--max-new-tokens", "4"], "max_new_tokens"),
    (["--prompt", "what is this ?"], "prompt"),
    (["--batch-size", "1"], "batch_size"),
    (["--num-images", "2"], "num_images"),
    (["--seed", "3"], "seed"),
    (["--model", "tiny-llava-next"], "model"),
])
def test_resume_with_other_settings_is_refused(greedy_run, tmp_path, capsys, extra, key):
    """Old main reused the greedy captions for `--decoding sample:temperature=5`, printed their CHAIR and
    labelled metrics.json with the new decoding. Now: one line naming the differing key and the fix, nothing
    touched (the refusal comes before any model loads)."""
    from vlmscope.cli import main

    data, run = greedy_run
    out = _copy(run, tmp_path)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_chair_argv(data, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "--force-new" in err[0], err
    assert _snapshot(out) == before


def test_run_json_records_settings_as_spec_strings(greedy_run):
    from vlmscope.decoding import DECODINGS
    from vlmscope.decoding.greedy import Greedy

    _, out = greedy_run
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "eval-chair"
    settings = run["settings"]
    assert settings["decoding"] == "greedy" and DECODINGS.parse(settings["decoding"]) == Greedy()
    assert settings["interventions"] == [] and settings["max_new_tokens"] == 3 and settings["batch_size"] == 2
    assert settings["prompt"] == "describe this image ." and settings["num_images"] == 3
    assert settings["model"] == "tiny-llava" and settings["dtype"] == "float32"
    assert settings["images"].startswith("sha256:")
    prov = run["provenance"]
    assert set(prov) >= {"versions", "model", "revision", "decoding", "device", "dtype", "wall_seconds"}
    assert prov["wall_seconds"] > 0
    assert (prov["rows_reused"], prov["rows_computed"]) == (0, 3)
    # metrics.json records the same specs, never a Python repr such as "Greedy()".
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["decoding"] == "greedy" and "Greedy()" not in json.dumps(metrics)


def test_force_new_discards_and_relabels(greedy_run, tmp_path, capsys):
    from vlmscope.cli import main

    data, run = greedy_run
    out = _copy(run, tmp_path)
    (out / "captions.jsonl").write_text('{"image_id": 139, "image": "x", "caption": "planted"}\n')
    assert main(_chair_argv(data, out, "--decoding", "beam:num_beams=2", "--force-new")) == 0
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["caption"] != "planted" for r in rows)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["decoding"] == "beam:num_beams=2,length_penalty=1.0,early_stopping=false"
    assert json.loads((out / "metrics.json").read_text())["settings"]["decoding"] == settings["decoding"]


def test_kill_and_resume_reports_reuse_without_loss_or_duplicates(greedy_run, tmp_path, capsys):
    from vlmscope.cli import main

    data, run = greedy_run
    out = _copy(run, tmp_path)
    full = (out / "captions.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    # Killed while writing the second row: one complete row and half a line.
    (out / "captions.jsonl").write_text(lines[0] + lines[1][:10])
    capsys.readouterr()
    assert main(_chair_argv(data, out)) == 0
    err = capsys.readouterr().err
    assert "reused 1 stored captions.jsonl rows of 3, computing 2" in err
    assert (out / "captions.jsonl").read_text() == full  # greedy is deterministic: the same rows, once each
    # A complete run restarted: everything reused, nothing written.
    before = (out / "captions.jsonl").read_bytes()
    assert main(_chair_argv(data, out)) == 0
    assert "reused 3 stored captions.jsonl rows of 3, computing 0" in capsys.readouterr().err
    assert (out / "captions.jsonl").read_bytes() == before


def test_rescoring_keys_may_change_on_resume(tmp_path, capsys):
    """The POPE answer rule only changes the scoring: a resume with another rule rescores the stored answers."""
    from vlmscope.cli import main

    data, ids = _coco_dir(tmp_path, (139, 285))
    questions = _questions(tmp_path / "coco_pope_random.jsonl", ids, "random")
    argv = ["eval", "pope", "--model", "tiny-llava", "--data-path", str(data), "--out", str(tmp_path / "p"),
            "--questions", str(questions), "--max-new-tokens", "2"]
    assert main(argv) == 0
    answers = (tmp_path / "p" / "answers.jsonl").read_bytes()
    assert main([*argv, "--rule", "exact"]) == 0
    assert (tmp_path / "p" / "answers.jsonl").read_bytes() == answers
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["settings"]["rule"] == "exact"
    assert json.loads((tmp_path / "p" / "run.json").read_text())["settings"]["rule"] == "exact"
    assert main([*argv, "--max-new-tokens", "3"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_foreign_and_legacy_folders_are_refused(greedy_run, tmp_path, capsys):
    from vlmscope.cli import main

    data, run = greedy_run
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for force in ([], ["--force-new"]):
        assert main(_chair_argv(data, foreign, *force)) == 2
        assert "notes.txt" in capsys.readouterr().err
        assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    legacy = _copy(run, tmp_path)
    (legacy / "run.json").unlink()  # as an older vlmscope left it
    assert main(_chair_argv(data, legacy)) == 2
    err = capsys.readouterr().err
    assert "run.json" in err and "--force-new" in err


@pytest.mark.parametrize("extra", [["--max-new-tokens", "-5"], ["--max-new-tokens", "0"], ["--batch-size", "0"],
                                   ["--num-images", "0"], ["--model", "no-such-model"]])
def test_bad_numbers_and_failed_runs_leave_no_folder(tmp_path, capsys, extra):
    """Old main: -5 tokens gave empty captions and CHAIR 0.0 (exit 0); 0 fell back to the config; a failed
    run left an empty folder."""
    from vlmscope.cli import main

    data, _ = _coco_dir(tmp_path, (139,))
    out = tmp_path / "run"
    assert main([*_chair_argv(data, out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists()


def test_a_run_failing_before_its_first_row_removes_its_folder(tmp_path, monkeypatch):
    import vlmscope.eval.model_eval as model_eval
    from vlmscope.cli import main

    def broken(*args, **kwargs):
        def run(paths):
            raise RuntimeError("out of memory")
        return run

    monkeypatch.setattr(model_eval, "caption_fn", broken)
    data, _ = _coco_dir(tmp_path, (139,))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="out of memory"):  # an internal error keeps its traceback
        main(_chair_argv(data, out))
    assert not out.exists()


def test_eval_json_is_one_document(greedy_run, tmp_path, capsys):
    from vlmscope.cli import main

    data, run = greedy_run
    out = _copy(run, tmp_path)
    capsys.readouterr()
    assert main([*_chair_argv(data, out), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["kind"] == "eval-chair" and doc["reused"] == 3 and doc["computed"] == 0
    assert doc["metrics"] == json.loads((out / "metrics.json").read_text())["metrics"]
    assert doc["settings"]["decoding"] == "greedy"
    assert "CHAIR_S" in captured.err  # the table went to stderr
