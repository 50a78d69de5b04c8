"""`vlmscope eval amber` on the tiny model (resume, rescoring, refusals) and `vlmscope amber score`."""

from __future__ import annotations

import json
import shutil

import pytest
from stock_oracles import stock_greedy_text
from test_amber import PARITY

from vlmscope.eval.amber import amber_scores, select_queries


def _amber_dir(root, ids=(1, 2, 3)):
    import numpy as np
    from PIL import Image

    data = root / "amber_images"
    data.mkdir()
    for i in ids:
        Image.fromarray((np.random.default_rng(i).random((40, 48, 3)) * 255).astype("uint8")).save(
            data / f"AMBER_{i}.jpg")
    return data


def _argv(data, out, *extra):
    return ["eval", "amber", "--model", "tiny-llava", "--data-path", str(data), "--out", str(out),
            "--num-images", "2", "--max-new-tokens", "3", "--batch-size", "8", *extra]


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def amber_run(tmp_path_factory, nltk_data):
    from vlmscope.cli import main

    root = tmp_path_factory.mktemp("amber")
    data = _amber_dir(root)
    out = root / "run"
    assert main(_argv(data, out)) == 0
    return data, out



def test_run_answers_the_official_queries_and_scores_them(amber_run):
    data, out = amber_run
    queries = select_queries("all", 2)
    assert {q["image"] for q in queries} == {"AMBER_1.jpg", "AMBER_2.jpg"} and queries[0]["id"] == 1
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [q["id"] for q in queries]
    by_id = {r["id"]: r for r in rows}
    assert by_id[1]["query"] == "Describe this image."
    assert by_id[1]["response"] == stock_greedy_text(data / "AMBER_1.jpg", "Describe this image.", 3)
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "eval-amber"
    s = run["settings"]
    assert (s["amber_task"], s["amber_parser"], s["amber_similarity"], s["num_images"]) == ("all", "reference", "auto", 2)
    assert s["decoding"] == "greedy" and s["num_queries"] == len(queries) and s["bootstrap"] == 1000
    metrics = json.loads((out / "metrics.json").read_text())
    expected = amber_scores([{"id": r["id"], "response": r["response"]} for r in rows], "all", similarity="skip")
    assert metrics["metrics"] == expected.metrics
    assert metrics["scoring"]["similarity"] == "skipped (spaCy en_core_web_lg not installed)"
    assert metrics["settings"]["decoding"] == "greedy"
    assert {"metrics.md", "amber_details.json"} <= set(p.name for p in out.iterdir())
    assert set(metrics["intervals"]) >= {"CHAIR", "F1", "AMBER_Score"} and metrics["bootstrap"]["unit"] == "image"


def test_kill_resume_rescore_and_refusals(amber_run, tmp_path, capsys):
    from vlmscope.cli import main

    data, run = amber_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    full = (out / "responses.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    n = len(lines)
    (out / "responses.jsonl").write_text("".join(lines[:5]) + lines[5][:7])  # killed mid-row
    capsys.readouterr()
    assert main(_argv(data, out)) == 0
    assert f"reused 5 stored responses.jsonl rows of {n}, computing {n - 5}" in capsys.readouterr().err
    assert (out / "responses.jsonl").read_text() == full
    # The parser only rescores: stored rows kept, metrics and run.json relabelled.
    assert main(_argv(data, out, "--amber-parser", "lenient")) == 0
    assert (out / "responses.jsonl").read_text() == full
    assert json.loads((out / "metrics.json").read_text())["scoring"]["parser"] == "lenient"
    assert json.loads((out / "run.json").read_text())["settings"]["amber_parser"] == "lenient"
    # --json: stdout is one JSON document that says how the stored rows were scored.
    capsys.readouterr()
    assert main(_argv(data, out, "--amber-parser", "halva", "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["scoring"]["parser"] == "halva" and printed["reused"] == n and printed["computed"] == 0
    assert printed["scoring"]["similarity"] == "skipped (spaCy en_core_web_lg not installed)"
    assert main(_argv(data, out, "--amber-parser", "lenient")) == 0
    before = _snapshot(out)
    for extra, key in ((["--max-new-tokens", "4"], "max_new_tokens"), (["--amber-task", "generative"], "amber_task"),
                       (["--decoding", "beam:num_beams=2"], "decoding"),
                       (["--amber-suffix", " Answer yes or no."], "discriminative_suffix")):
        capsys.readouterr()
        assert main(_argv(data, out, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0] and "--force-new" in err[0], err
        assert _snapshot(out) == before


@pytest.mark.parametrize("extra, message", [
    (["--num-images", "4"], "AMBER_4.jpg"),
    (["--rule", "exact"], "--rule does not apply"),
    (["--amber-similarity", "missing.json"], "similarity table not found"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, nltk_data, extra, message):
    from vlmscope.cli import main

    data = _amber_dir(tmp_path)
    out = tmp_path / "run"
    assert main([*_argv(data, out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_amber_option_on_a_coco_task_is_refused(tmp_path, capsys):
    from vlmscope.cli import main

    assert main(["eval", "pope", "--model", "tiny-llava", "--data-path", str(tmp_path), "--out", str(tmp_path / "p"),
                 "--amber-parser", "lenient"]) == 2
    assert "AMBER option" in capsys.readouterr().err


def test_amber_score_command(tmp_path, capsys, nltk_data):
    from vlmscope.cli import main

    responses = PARITY / "responses.json"
    capsys.readouterr()
    assert main(["amber", "score", str(responses), "--similarity", "skip", "--json", "--out", str(tmp_path / "m")]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)  # one JSON document on stdout
    reference = json.loads((PARITY / "reference.json").read_text())["runs"]["zero"]["metrics"]
    assert payload["metrics"]["CHAIR"] == reference["Generative Task"]["CHAIR"]
    assert payload["metrics"]["F1"] == reference["Descriminative Task"]["F1"]
    assert "AMBER  CHAIR" in captured.err and (tmp_path / "m" / "metrics.json").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1005, "response": "Yes"}, {"id": 1005, "response": "No"}]')
    assert main(["amber", "score", str(bad), "--out", str(tmp_path / "n")]) == 2
    assert "twice" in capsys.readouterr().err and not (tmp_path / "n").exists()


def test_sharded_run_merges_every_row_once(amber_run, tmp_path, monkeypatch):
    """Two accelerate processes simulated one after the other (rank 1, then rank 0 merges and scores):
    the same rows, in query order, and the same metrics as the single-process run."""
    import vlmscope.eval.model_eval as model_eval
    from vlmscope.cli import main

    data, single = amber_run
    sharded = tmp_path / "sharded"
    for rank in (1, 0):
        monkeypatch.setattr(model_eval, "current_shard", lambda rank=rank: model_eval.Shard(rank, 2))
        assert main(_argv(data, sharded)) == 0
    assert (sharded / "responses.jsonl").read_text() == (single / "responses.jsonl").read_text()
    assert json.loads((sharded / "metrics.json").read_text())["metrics"] == \
        json.loads((single / "metrics.json").read_text())["metrics"]


def test_suffix_reaches_the_yes_no_prompts(amber_run, tmp_path):
    from vlmscope.cli import main

    data, _ = amber_run
    out = tmp_path / "run"
    suffix = " Answer yes or no."
    assert main(_argv(data, out, "--amber-task", "existence", "--amber-suffix", suffix, "--num-images", "1")) == 0
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [q["id"] for q in select_queries("existence", 1)]
    first = rows[0]
    assert first["response"] == stock_greedy_text(data / first["image"], first["query"] + suffix, 3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"existence"} and metrics["settings"]["discriminative_suffix"] == suffix
