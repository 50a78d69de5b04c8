"""POPE on A-OKVQA and GQA: the shipped question files, their names and protocols, image folders per dataset,
metrics named by dataset, and an end-to-end run on the tiny model with resume."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from stock_oracles import stock_greedy_text

from vlmscope.cli import main
from vlmscope.errors import InputError
from vlmscope.eval.pope import (
    dataset_groups,
    image_folders,
    load_question_sets,
    load_questions,
    pope_scores,
    question_set_files,
)
from vlmscope.eval.protocols import (
    PROTOCOLS,
    bundled_pope_file,
    check_pope_questions,
    get_protocol,
    identify_pope_questions,
)
from vlmscope.eval.stats import pope_intervals

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("random", "popular", "adversarial")

# Figures of the reference note (benchmarks_and_ecosystem.md §2), measured on DAMO-NLP-SG/VCD at d6568ff:
# bytes and SHA-256 prefixes of experiments/data/POPE/{aokvqa,gqa}/*_pope_{split}.json.
ORIGINALS = {
    ("aokvqa", "random"): (366_825, "900c244605e8d436"),
    ("aokvqa", "popular"): (363_595, "792d586a875c1973"),
    ("aokvqa", "adversarial"): (365_037, "87f9acb460fcb690"),
    ("gqa", "random"): (312_270, "1c1117ce33df2eae"),
    ("gqa", "popular"): (309_332, "e48e138bd61dd3bc"),
    ("gqa", "adversarial"): (310_784, "64a3bdeb8d24c02d"),
}
IMAGE_NAME = {"aokvqa": re.compile(r"COCO_val2014_(\d{12})\.jpg"), "gqa": re.compile(r"(\d+)\.jpg")}
ID_RANGE = {"aokvqa": (2299, 579970), "gqa": (347, 2417245)}


# ------------------------------------------------------------------------------------------------------------
# The shipped files


@pytest.mark.parametrize("dataset, split", sorted(ORIGINALS))
def test_shipped_files_are_the_originals_byte_for_byte(dataset, split):
    data = bundled_pope_file(split, dataset).read_bytes()
    size, prefix = ORIGINALS[dataset, split]
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest().startswith(prefix)


@pytest.mark.parametrize("dataset", ["aokvqa", "gqa"])
def test_shipped_sets_have_the_published_shape(dataset):
    images_per_split = []
    for split in SPLITS:
        questions = load_questions(bundled_pope_file(split, dataset))
        assert [q["question_id"] for q in questions] == list(range(1, 3001))
        assert Counter(q["label"] for q in questions) == {"yes": 1500, "no": 1500}
        per_image = Counter(q["image"] for q in questions)
        assert len(per_image) == 500 and set(per_image.values()) == {6}
        ids = [int(IMAGE_NAME[dataset].fullmatch(name).group(1)) for name in per_image]
        assert ID_RANGE[dataset][0] <= min(ids) and max(ids) <= ID_RANGE[dataset][1]
        assert all(re.fullmatch(r"Is there an? [a-z][a-z ]*[a-z] in the image\?", q["text"]) for q in questions)
        images_per_split.append(set(per_image))
    assert images_per_split[0] == images_per_split[1] == images_per_split[2]


def test_aokvqa_shares_eleven_images_with_coco_pope():
    aokvqa = {q["image"] for q in load_questions(bundled_pope_file("random", "aokvqa"))}
    coco = {q["image"] for q in load_questions(bundled_pope_file("random"))}
    assert len(aokvqa & coco) == 11


def test_licence_and_attribution_are_recorded():
    text = (REPO / "src" / "vlmscope" / "data" / "LICENSES.md").read_text(encoding="utf-8")
    for dataset in ("aokvqa", "gqa"):
        row = next(line for line in text.splitlines() if f"pope/{dataset}_pope_" in line)
        assert "DAMO-NLP-SG/VCD" in row and "Apache-2.0" in row and "AoiDragon/POPE" in row


# ------------------------------------------------------------------------------------------------------------
# Names and protocols


def test_names_resolve_to_the_shipped_files_with_dataset_labels():
    questions = load_question_sets(["aokvqa", "gqa-popular", "coco-random"])
    counts = Counter((q["dataset"], q["split"]) for q in questions)
    assert counts == {("aokvqa", "aokvqa-random"): 3000, ("aokvqa", "aokvqa-popular"): 3000,
                      ("aokvqa", "aokvqa-adversarial"): 3000, ("gqa", "gqa-popular"): 3000, ("coco", "random"): 3000}
    assert question_set_files(["gqa"]) == [bundled_pope_file(s, "gqa") for s in SPLITS]
    with pytest.raises(InputError, match="unknown POPE question set 'gqa-rand'.*gqa-random"):
        load_question_sets(["gqa-rand"])
    with pytest.raises(InputError, match="gqa-random is given twice"):
        load_question_sets(["gqa", str(bundled_pope_file("random", "gqa"))])


def test_a_reformatted_copy_is_recognised_by_its_questions(tmp_path):
    # AoiDragon/POPE ships the same questions as an indented JSON array under another name.
    questions = load_questions(bundled_pope_file("adversarial", "gqa"))
    copy = tmp_path / "seem_questions.json"
    copy.write_text(json.dumps([{k: q[k] for k in ("question_id", "image", "text", "label")} for q in questions],
                               indent=4))
    loaded = load_question_sets([str(copy)])
    assert {(q["dataset"], q["split"]) for q in loaded} == {("gqa", "gqa-adversarial")}
    assert identify_pope_questions(questions[:-1]) is None


def test_dataset_protocols_check_counts_labels_and_fingerprints():
    names = {f"pope-{d}{s}" for d in ("aokvqa", "gqa") for s in ("", "-random", "-popular", "-adversarial")}
    assert names <= set(PROTOCOLS)
    whole = get_protocol("pope-gqa", "pope")
    assert whole.splits == ("gqa-random", "gqa-popular", "gqa-adversarial")
    assert whole.record()["dataset"] == "gqa" and "dataset" not in get_protocol("pope-coco").record()
    by_split: dict[str, list] = {}
    for q in load_question_sets(["gqa"]):
        by_split.setdefault(q["split"], []).append(q)
    check_pope_questions(whole, by_split)  # the shipped files pass
    with pytest.raises(InputError, match="split"):
        check_pope_questions(get_protocol("pope-aokvqa"), by_split)
    edited = [dict(q) for q in by_split["gqa-random"]]
    edited[0]["text"] = "Is there a cat in the image?"
    with pytest.raises(InputError, match="differ from protocol pope-gqa-random"):
        check_pope_questions(get_protocol("pope-gqa-random"), {"gqa-random": edited})
    edited[0]["label"] = "no"
    with pytest.raises(InputError, match="labels"):
        check_pope_questions(get_protocol("pope-gqa-random"), {"gqa-random": edited})
    with pytest.raises(InputError, match="3000 gqa-random questions, the file has 2999"):
        check_pope_questions(get_protocol("pope-gqa-random"), {"gqa-random": edited[1:]})


def test_pope_score_by_name_reports_the_dataset(tmp_path, capsys):
    questions = load_questions(bundled_pope_file("random", "aokvqa"))
    # "Yes" to every third question: hand-counted oracle below.
    answers = [{"question_id": q["question_id"], "answer": "Yes" if q["question_id"] % 3 == 0 else "No"}
               for q in questions]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
    assert main(["pope", "score", "--answers", str(path), "--questions", "aokvqa-random", "--protocol",
                 "pope-aokvqa-random", "--bootstrap", "0", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    said_yes = {q["question_id"] for q in questions if q["question_id"] % 3 == 0}
    tp = sum(q["label"] == "yes" and q["question_id"] in said_yes for q in questions)
    fp = sum(q["label"] == "no" and q["question_id"] in said_yes for q in questions)
    tn = sum(q["label"] == "no" and q["question_id"] not in said_yes for q in questions)
    split = record["splits"]["aokvqa-random"]
    assert split["dataset"] == "aokvqa" and split["n"] == 3000
    assert split["Accuracy"] == pytest.approx(100 * (tp + tn) / 3000)
    assert split["Precision"] == pytest.approx(100 * tp / (tp + fp))
    assert split["Recall"] == pytest.approx(100 * tp / 1500)
    assert split["Yes_ratio"] == pytest.approx(100 / 3)
    assert record["protocol"] == "pope-aokvqa-random" and "mean" not in record
    assert record["datasets"]["aokvqa"]["mean"]["Accuracy"] == pytest.approx(split["Accuracy"])
    # A COCO protocol refuses these questions.
    assert main(["pope", "score", "--answers", str(path), "--questions", "aokvqa-random", "--protocol",
                 "pope-random", "--bootstrap", "0"]) == 2
    assert "protocol pope-random is the split(s) random, got aokvqa-random" in capsys.readouterr().err


def test_dataset_means_and_intervals_equal_the_coco_computation():
    """A one-dataset run's "aokvqa/<metric>" (value and bootstrap interval) is what the plain mean over the same
    answers is without dataset labels: the dataset only renames, it does not change the numbers."""
    questions = [q for s in SPLITS for q in load_questions(bundled_pope_file(s, "aokvqa"))][::10]
    answers = ["yes" if (q["question_id"] * 7) % 5 < 3 else "no" for q in questions]
    named = [{**q, "split": f"aokvqa-{q['split']}", "dataset": "aokvqa"} for q in questions]
    plain = pope_scores(answers, questions)
    scores = pope_scores(answers, named)
    assert dataset_groups(scores["items"]) == {"aokvqa": ["aokvqa-random", "aokvqa-popular", "aokvqa-adversarial"]}
    assert scores["datasets"]["aokvqa"]["mean"] == pytest.approx(plain["mean"])
    ci_named = pope_intervals(scores["items"], 200, 3)
    ci_plain = pope_intervals(plain["items"], 200, 3)
    assert "Accuracy" not in ci_named  # no unnamed mean once datasets are named
    for metric in ("Accuracy", "F1", "Yes_ratio"):
        assert ci_named[f"aokvqa/{metric}"].low == pytest.approx(ci_plain[metric].low)
        assert ci_named[f"aokvqa/{metric}"].high == pytest.approx(ci_plain[metric].high)
        assert ci_named[f"aokvqa-popular/{metric}"].low == pytest.approx(ci_plain[f"popular/{metric}"].low)


# ------------------------------------------------------------------------------------------------------------
# Image folders


def _image(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((32, 40, 3)) * 255).astype("uint8")).save(path)


def _subset(tmp_path: Path, dataset: str, n: int) -> tuple[Path, list[dict]]:
    """The first `n` questions of the shipped random split, under the shipped file's name, and their images."""
    questions = load_questions(bundled_pope_file("random", dataset))[:n]
    path = tmp_path / f"{dataset}_pope_random.jsonl"
    path.write_text("".join(json.dumps({k: q[k] for k in ("question_id", "image", "text", "label")}) + "\n"
                            for q in questions))
    folder = tmp_path / f"{dataset}-images"
    folder.mkdir(exist_ok=True)
    for k, name in enumerate(dict.fromkeys(q["image"] for q in questions)):
        _image(folder / name, k + (100 if dataset == "gqa" else 0))
    return path, questions


def test_image_folders_per_dataset(tmp_path):
    a_file, _ = _subset(tmp_path, "aokvqa", 6)
    g_file, g_questions = _subset(tmp_path, "gqa", 6)
    a_dir, g_dir = tmp_path / "aokvqa-images", tmp_path / "gqa-images"
    questions = load_question_sets([str(a_file), str(g_file)])
    assert image_folders([str(a_dir), f"gqa={g_dir}"], questions) == {"aokvqa": a_dir, "gqa": g_dir}
    assert image_folders([f"aokvqa={a_dir}", f"gqa={g_dir}"], questions) == {"aokvqa": a_dir, "gqa": g_dir}
    with pytest.raises(InputError, match=rf"images are not in .*first: {re.escape(str(a_dir / g_questions[0]['image']))}"
                       r"\); pass --data-path gqa=DIR with DIR holding GQA images"):
        image_folders([str(a_dir)], questions)
    with pytest.raises(InputError, match="no image folder for the gqa questions; pass --data-path gqa=DIR"):
        image_folders([f"aokvqa={a_dir}"], questions)
    with pytest.raises(InputError, match="unknown dataset 'vg'"):
        image_folders([f"vg={g_dir}"], questions)
    with pytest.raises(InputError, match="names a dataset this run has no questions of"):
        image_folders([str(a_dir), f"coco={a_dir}", f"gqa={g_dir}"], questions)


# ------------------------------------------------------------------------------------------------------------
# End to end on the tiny model



def test_aokvqa_and_gqa_end_to_end_with_resume(tmp_path, monkeypatch, capsys):
    import vlmscope.eval.model_eval as model_eval

    a_file, a_questions = _subset(tmp_path, "aokvqa", 6)
    g_file, g_questions = _subset(tmp_path, "gqa", 4)
    a_dir, g_dir = tmp_path / "aokvqa-images", tmp_path / "gqa-images"
    seen: list[tuple[str, str]] = []
    real = model_eval.answer_fn

    def spying_answer_fn(*args, **kwargs):
        fn = real(*args, **kwargs)
        return lambda items: (seen.extend(items), fn(items))[1]

    monkeypatch.setattr(model_eval, "answer_fn", spying_answer_fn)
    out = tmp_path / "run"
    argv = ["eval", "pope", "--model", "tiny-llava", "--questions", str(a_file), str(g_file),
            "--data-path", str(a_dir), "--data-path", f"gqa={g_dir}", "--out", str(out),
            "--max-new-tokens", "2", "--batch-size", "4", "--bootstrap", "50"]
    assert main(argv) == 0
    capsys.readouterr()
    # Every question was asked on its own dataset's image.
    expected = [(str(a_dir / q["image"]), q["text"]) for q in a_questions]
    expected += [(str(g_dir / q["image"]), q["text"]) for q in g_questions]
    assert sorted(seen) == sorted(expected)
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["qkey"] for r in rows] == [f"aokvqa-random:{i}" for i in range(1, 7)] + \
        [f"gqa-random:{i}" for i in range(1, 5)]
    gqa_row = rows[6]
    assert gqa_row["answer"] == stock_greedy_text(str(g_dir / gqa_row["image"]), gqa_row["text"], 2)

    payload = json.loads((out / "metrics.json").read_text())
    assert set(payload["splits"]) == {"aokvqa-random", "gqa-random"}
    assert payload["splits"]["gqa-random"]["dataset"] == "gqa" and payload["splits"]["gqa-random"]["n"] == 4
    assert set(payload["datasets"]) == {"aokvqa", "gqa"}
    # No unnamed number: every metric and interval names its dataset.
    assert all(k.split("/")[0] in ("aokvqa", "gqa", "aokvqa-random", "gqa-random") for k in payload["metrics"])
    assert all(k.split("/")[0] in ("aokvqa", "gqa", "aokvqa-random", "gqa-random") for k in payload["intervals"])
    assert {"aokvqa/F1", "gqa/Accuracy", "gqa-random/Accuracy"} <= set(payload["metrics"])
    for split, m in payload["splits"].items():  # per split: the counts give the metrics
        assert m["Accuracy"] == pytest.approx(100 * (m["tp"] + m["tn"]) / m["n"])
        assert f"{split}/Precision" in payload["intervals"]
    assert payload["settings"]["data_path"] == {"aokvqa": str(a_dir.resolve()), "gqa": str(g_dir.resolve())}
    md = (out / "metrics.md").read_text()
    assert "| A-OKVQA | random | 6 |" in md and "| GQA | random | 4 |" in md

    # Resume: the second run reuses every row and computes none.
    seen.clear()
    first = (out / "answers.jsonl").read_text()
    assert main(argv) == 0
    assert "10 stored rows reused, 0 computed" in capsys.readouterr().out
    assert seen == [] and (out / "answers.jsonl").read_text() == first

    # Other settings are refused, before the model loads, and nothing is written.
    other_images = tmp_path / "other-gqa"
    other_images.mkdir()
    for q in g_questions:
        _image(other_images / q["image"], 7)
    for change, key in ((["--max-new-tokens", "3"], "max_new_tokens"),
                        ([f"gqa={other_images}"], "data_path")):
        bad = list(argv)
        if key == "data_path":
            bad[bad.index(f"gqa={g_dir}")] = change[0]
        else:
            bad[bad.index("--max-new-tokens") + 1] = change[1]
        bad[bad.index("tiny-llava")] = "no-such-model"
        assert main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0] and "--force-new" in err[0]
    assert (out / "answers.jsonl").read_text() == first


def test_missing_image_is_one_line_before_the_model_loads(tmp_path, capsys):
    g_file, g_questions = _subset(tmp_path, "gqa", 6)
    g_dir = tmp_path / "gqa-images"
    gone = g_dir / g_questions[-1]["image"]
    gone.unlink()
    out = tmp_path / "run"
    assert main(["eval", "pope", "--model", "no-such-model", "--questions", str(g_file), "--data-path", str(g_dir),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(gone) in err[0] and "--data-path DIR with DIR holding GQA images" in err[0]
    assert not out.exists()
    # The seed-compatible script reads the whole shipped GQA set from --data-path.
    proc = subprocess.run([sys.executable, str(REPO / "pope_eval.py"), "--model", "no-such-model", "--data-path",
                           str(g_dir), "--dataset", "gqa", "--pope-type", "popular", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "500 gqa images are not in" in proc.stderr and not out.exists()


def test_compare_refuses_runs_on_different_datasets(tmp_path, capsys):
    def run(name: str, datasets: dict | None) -> str:
        folder = tmp_path / name
        folder.mkdir()
        payload = {"task": "pope", "metrics": {"F1": 80.0}, **({"datasets": datasets} if datasets else {})}
        (folder / "metrics.json").write_text(json.dumps(payload))
        return str(folder)

    coco_old = run("coco-old", None)  # written before datasets were recorded: COCO
    coco = run("coco", {"coco": {}})
    gqa = run("gqa", {"gqa": {}})
    assert main(["compare", coco_old, coco, "--bootstrap", "0"]) == 0
    capsys.readouterr()
    assert main(["compare", coco, gqa, "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different datasets (coco: coco, gqa: gqa)" in err[0]
    assert main(["compare", coco, gqa, "--bootstrap", "0", "--allow-protocol-mismatch"]) == 0


def test_intervals_of_a_mixed_run_resample_each_dataset_on_its_own():
    a = [{**q, "split": "aokvqa-random", "dataset": "aokvqa"}
         for q in load_questions(bundled_pope_file("random", "aokvqa"))[:60]]
    g = [{**q, "split": "gqa-random", "dataset": "gqa"} for q in load_questions(bundled_pope_file("random", "gqa"))[:30]]
    answers = ["yes" if q["question_id"] % 4 else "no" for q in a + g]
    both = pope_intervals(pope_scores(answers, a + g)["items"], 200, 1)
    alone = pope_intervals(pope_scores(answers[len(a):], g)["items"], 200, 1)
    assert {k: (v.low, v.high) for k, v in both.items() if k.startswith("gqa")} == \
        {k: (v.low, v.high) for k, v in alone.items()}
    assert not any(k in both for k in ("Accuracy", "F1"))  # no mean across datasets


def test_protocol_and_data_path_refusals_come_before_images_and_model(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["--model", "no-such-model", "--data-path", str(empty), "--out", str(tmp_path / "run")]
    # A dataset protocol reads its shipped files when no --questions are given ...
    assert main(["eval", "pope", "--protocol", "pope-aokvqa", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "500 aokvqa images are not in" in err[0] and "COCO_val2014_" in err[0]
    # ... and refuses another dataset's questions before looking at any image.
    assert main(["eval", "pope", "--protocol", "pope-aokvqa", "--questions", "coco", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "protocol pope-aokvqa is the split(s) aokvqa-random" in err[0]
    assert main(["eval", "chair", *common, "--data-path", f"gqa={empty}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chair takes one --data-path folder" in err[0]
    assert not (tmp_path / "run").exists()


def test_pope_score_table_names_the_dataset_of_every_row(tmp_path, capsys):
    questions = load_question_sets(["gqa", "coco-random"])
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"question_id": q["question_id"], "split": q["split"], "answer": "Yes"}) + "\n"
                            for q in questions))
    assert main(["pope", "score", "--answers", str(path), "--questions", "gqa", "--questions", "coco-random",
                 "--bootstrap", "0"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    # Everything "yes": accuracy 50, precision 50, recall 100, yes-ratio 100 in every split (hand-computed).
    assert [r[:2] for r in rows] == [["GQA", "gqa-random"], ["GQA", "gqa-popular"], ["GQA", "gqa-adversarial"],
                                     ["MSCOCO", "random"], ["GQA", "mean"]]
    assert all(r[2:7] == ["50.0", "50.0", "100.0", "66.7", "100.0"] for r in rows)
