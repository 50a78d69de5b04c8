"""vlmscope's lmms-eval tasks (`vlmscope lmms-tasks-path`) through the real `lmms-eval` CLI, offline, on a tiny LLaVA.

Runs in .lmms-venv (`bash scripts/lmms_eval.sh`); without lmms-eval installed the whole file is skipped. The
shipped tasks run unchanged on the first questions of the shipped GQA and A-OKVQA files (`--limit`), with
generated images under the dataset's own file names. Oracles: every logged answer is `vlmscope.load(model)
.generate(image, question)` on that document alone (the task's decoding: greedy, 16 new tokens, no stop string);
every metric is `vlmscope.eval.pope.pope_scores` (what `vlmscope pope score` prints) on those answers and the
shipped questions, and the group's metrics are `pope_scores`' dataset mean over the splits; the AMBER tasks'
are `vlmscope.eval.amber.amber_scores` on the run's responses (what `vlmscope amber score` prints).
The NLTK data AMBER's descriptions need come from ../shared/data/nltk, as in test_amber.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed here: bash scripts/lmms_eval.sh runs this file")

from PIL import Image, ImageDraw  # noqa: E402

import vlmscope  # noqa: E402
from vlmscope.errors import InputError  # noqa: E402
from vlmscope.eval.pope import load_question_sets, pope_scores  # noqa: E402
from vlmscope.integrations.lmms_tasks import utils as task_utils  # noqa: E402

LIMIT = 12  # the first two images of each split (six questions per image)
AMBER_LIMIT = 4  # descriptions (512 new tokens each) and yes/no questions
MAX_NEW_TOKENS = 16  # the shipped template's
METRICS = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1", "yes_ratio": "Yes_ratio"}
GQA_SPLITS = ["gqa-random", "gqa-popular", "gqa-adversarial"]


def tasks_path() -> str:
    """The folder as users get it: `python -m vlmscope lmms-tasks-path`."""
    out = subprocess.run([sys.executable, "-m", "vlmscope", "lmms-tasks-path"], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def first_questions(split: str) -> list[dict]:
    return [q for q in load_question_sets([split]) if q["question_id"] <= LIMIT]


def write_images(folder: Path, questions: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(dict.fromkeys(q["image"] for q in questions)):
        image = Image.new("RGB", (48 + 8 * k, 40), ((90 * k + 100) % 255, 90, 120))
        ImageDraw.Draw(image).ellipse((4, 4, 30, 30), fill=[(200, 30, 30), (40, 60, 210), (230, 220, 40)][(k + 2) % 3])
        image.save(folder / name)  # JPEG, as the datasets ship them


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from vlmscope.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("lmms-tasks")
    # Seed 4 and these images: the random model's answers parse as "yes" and as "no" (checked below).
    model_dir = save_tiny("llava", root / "tiny-llava", seed=4)
    questions = {split: first_questions(split) for split in [*GQA_SPLITS, "aokvqa-random"]}
    write_images(root / "gqa", questions["gqa-random"])
    write_images(root / "coco", questions["aokvqa-random"])
    return {"root": root, "model": str(model_dir), "questions": questions, "tasks_path": tasks_path()}


def run_lmms_eval(setup: dict, name: str, tasks: str, env_extra: dict[str, str],
                  limit: int = LIMIT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VLMSCOPE_COCO_DIR", "VLMSCOPE_GQA_DIR", "VLMSCOPE_AMBER_DIR")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_HOME": str(setup["root"] / "hf"), "TOKENIZERS_PARALLELISM": "false", **env_extra})
    command = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "vlmscope",
               "--model_args", f"pretrained={setup['model']}", "--tasks", tasks,
               "--include_path", setup["tasks_path"], "--limit", str(limit), "--batch_size", "4", "--device", "cpu",
               "--output_path", str(setup["root"] / name), "--log_samples"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run(setup: dict) -> dict:
    root = setup["root"]
    proc = run_lmms_eval(setup, "run", "vlmscope_pope_gqa,vlmscope_pope_aokvqa_random",
                         {"VLMSCOPE_GQA_DIR": str(root / "gqa"), "VLMSCOPE_COCO_DIR": str(root / "coco")})
    # lmms-eval exits 0 even when the evaluation raised: the output files are the evidence.
    results = sorted((root / "run").rglob("*_results.json"))
    assert results, f"no lmms-eval results (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    samples = {}
    for split in setup["questions"]:
        task = "vlmscope_pope_" + split.replace("-", "_")
        files = sorted((root / "run").rglob(f"*_samples_{task}.jsonl"))
        assert files, f"no samples log of {task}"
        samples[split] = [json.loads(line) for line in files[-1].read_text().splitlines()]
    return {"results": json.loads(results[-1].read_text())["results"], "samples": samples}


def logged_answers(records: list[dict]) -> dict[int, str]:
    """{question_id: the answer lmms-eval scored} (the id as the task's process_results logged it)."""
    out = {}
    for r in records:
        answer = r["filtered_resps"][0] if isinstance(r["filtered_resps"], list) else r["filtered_resps"]
        assert r["accuracy"]["answer"] == answer
        out[r["accuracy"]["question_id"]] = answer
    return out


def test_logged_answers_equal_vlmscope_generate(setup: dict, run: dict) -> None:
    vlm = vlmscope.load(setup["model"])
    folders = {"gqa": setup["root"] / "gqa", "aokvqa": setup["root"] / "coco"}
    for split, questions in setup["questions"].items():
        answers = logged_answers(run["samples"][split])
        assert sorted(answers) == [q["question_id"] for q in questions]  # the shipped file's first questions
        for record in run["samples"][split]:
            q = questions[record["doc_id"]]
            assert record["accuracy"]["question_id"] == q["question_id"] and record["target"] == q["label"]
            assert record["input"] == q["text"]  # the prompt is the POPE question as it stands
        expected = {}
        for q in questions:
            image = Image.open(folders[q["dataset"]] / q["image"]).convert("RGB")
            expected[q["question_id"]] = vlm.generate(image, q["text"], max_new_tokens=MAX_NEW_TOKENS).text.strip()
        assert answers == expected, split


def test_metrics_equal_vlmscope_pope_score(setup: dict, run: dict) -> None:
    results = run["results"]
    per_split = {}
    for split, questions in setup["questions"].items():
        answers = logged_answers(run["samples"][split])
        scored = pope_scores([{"question_id": i, "answer": a} for i, a in answers.items()], questions)
        per_split[split] = scored["splits"][split]
        task = "vlmscope_pope_" + split.replace("-", "_")
        for metric, key in METRICS.items():
            assert results[task][f"{metric},none"] == pytest.approx(per_split[split][key]), (task, metric)
    # The answers parse both ways and the yes-ratio is the predictions', not the labels' (50 here).
    assert all(0 < m["Yes_ratio"] < 100 and m["Yes_ratio"] != 50 for m in per_split.values())
    # The group = `vlmscope pope score --questions gqa`'s GQA mean, on the same answers.
    gqa_questions = [q for s in GQA_SPLITS for q in setup["questions"][s]]
    answers = [{"question_id": i, "answer": a, "split": s} for s in GQA_SPLITS
               for i, a in logged_answers(run["samples"][s]).items()]
    mean = pope_scores(answers, gqa_questions)["datasets"]["gqa"]["mean"]
    for metric, key in METRICS.items():
        assert results["vlmscope_pope_gqa"][f"{metric},none"] == pytest.approx(mean[key]), metric


def test_missing_image_folder_variable_is_named_and_nothing_is_scored(setup: dict) -> None:
    proc = run_lmms_eval(setup, "no-folder", "vlmscope_pope_gqa_random", {})
    # One line of lmms-eval's log says it (its CLI exits 0 all the same).
    assert ("Error during evaluation: VLMSCOPE_GQA_DIR is not set; set it to the folder holding GQA images"
            in proc.stdout + proc.stderr)
    assert not list((setup["root"] / "no-folder").rglob("*_results.json"))


# --- AMBER ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def amber_run(setup: dict, nltk_data: None) -> dict:
    from vlmscope.eval.amber import amber_queries

    root = setup["root"]
    queries = {task: amber_queries(task)[:AMBER_LIMIT] for task in ("generative", "discriminative")}
    write_images(root / "amber", [q for qs in queries.values() for q in qs])
    proc = run_lmms_eval(setup, "amber", "vlmscope_amber_generative,vlmscope_amber_discriminative",
                         {"VLMSCOPE_AMBER_DIR": str(root / "amber")}, limit=AMBER_LIMIT)
    results = sorted((root / "amber").rglob("*_results.json"))
    assert results, f"no lmms-eval results (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    samples = {}
    for task in queries:
        files = sorted((root / "amber").rglob(f"*_samples_vlmscope_amber_{task}.jsonl"))
        assert files, f"no samples log of vlmscope_amber_{task}"
        samples[task] = [json.loads(line) for line in files[-1].read_text().splitlines()]
    return {"queries": queries, "samples": samples, "results": json.loads(results[-1].read_text())["results"]}


def test_amber_responses_and_metrics_equal_vlmscope(setup: dict, amber_run: dict) -> None:
    from vlmscope.eval.amber import amber_scores

    vlm = vlmscope.load(setup["model"])
    names = {"generative": {"chair": "CHAIR", "cover": "Cover", "hal": "Hal", "cog": "Cog"},
             "discriminative": {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1",
                                "yes_ratio": "Yes_ratio", "attribute_f1": "attribute/F1"}}
    for task, queries in amber_run["queries"].items():
        first = next(iter(names[task]))
        logged = {r[first]["id"]: r["filtered_resps"][0] if isinstance(r["filtered_resps"], list)
                  else r["filtered_resps"] for r in amber_run["samples"][task]}
        assert sorted(logged) == [q["id"] for q in queries]  # the shipped files' first queries
        max_new_tokens = 512 if task == "generative" else 16
        expected = {}
        for q in queries:
            image = Image.open(setup["root"] / "amber" / q["image"]).convert("RGB")
            expected[q["id"]] = vlm.generate(image, q["query"], max_new_tokens=max_new_tokens).text.strip()
        assert logged == expected, task
        metrics = amber_scores([{"id": i, "response": a} for i, a in expected.items()], task=task).metrics
        results = amber_run["results"][f"vlmscope_amber_{task}"]
        for metric, key in names[task].items():
            assert results[f"{metric},none"] == metrics[key], (task, metric)
        if task == "generative":
            assert metrics["CHAIR"] > 0 and metrics["Cover"] > 0  # the descriptions name AMBER objects
    # The first yes/no queries are all attribute questions: the other blocks have nothing to score.
    assert amber_run["results"]["vlmscope_amber_discriminative"]["existence_f1,none"] is None


def test_amber_counters_start_once_per_run() -> None:
    # Two existence questions (truth no) and two attribute-state ones (truth yes, no), answered No, Yes, Yes, Yes.
    docs = [{"id": i} for i in (8633, 8634, 1005, 1006)]
    records = [task_utils.amber_process_results_discriminative(d, [r])["f1"]
               for d, r in zip(docs, ["No", "Yes", "Yes", "Yes"])]
    # By hand, the reference's counters over the run (the *_num ones start at 0.001): correct 2 of 4.001; "No"
    # answers 1, right 1 of 1.001; truth no 3, found 1 of 3.001; F1 from the rounded percentages (+0.0001).
    assert task_utils.discriminative_accuracy(records) == 50.0  # per-document counters averaged (amber_g): 49.95
    assert task_utils.discriminative_precision(records) == 99.9  # averaged per document: 24.975
    assert task_utils.discriminative_recall(records) == 33.3
    assert task_utils.discriminative_f1(records) == round(2 * 0.999 * 0.333 / (0.999 + 0.333 + 0.0001) * 100, 1) == 49.9
    assert task_utils.discriminative_yes_ratio(records) == 75.0  # the predictions': three Yes in four
    assert task_utils.discriminative_existence_f1(records) == task_utils.amber_metrics(records, "discriminative")["existence/F1"]


# --- in-process: the task functions -------------------------------------------------------------------------
def test_missing_image_names_the_variable(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMSCOPE_GQA_DIR", str(setup["root"] / "coco"))  # a folder without the GQA images
    with pytest.raises(InputError, match=r"image not found: .*2405722\.jpg; set VLMSCOPE_GQA_DIR to the folder"):
        task_utils.doc_to_visual_gqa({"image": "2405722.jpg"})
    monkeypatch.delenv("VLMSCOPE_AMBER_DIR", raising=False)
    with pytest.raises(InputError, match="VLMSCOPE_AMBER_DIR is not set; set it to the folder holding AMBER images"):
        task_utils.doc_to_visual_amber({"image": "AMBER_1.jpg"})
    monkeypatch.setenv("VLMSCOPE_COCO_DIR", str(setup["root"] / "nowhere"))
    with pytest.raises(InputError, match="VLMSCOPE_COCO_DIR=.* is not a folder; set VLMSCOPE_COCO_DIR"):
        task_utils.pope_doc_to_text_coco({"text": "Is there a cat in the image?"})


def test_aggregations_use_the_official_rule_and_predicted_yes_ratio() -> None:
    docs = [{"question_id": i + 1, "image": "x.jpg", "label": label} for i, label in enumerate("yes yes no no no".split())]
    # official rule: first sentence, a word No/not/no means "no"; "NO" and "isn't" mean "yes" (POPE's parser).
    answers = ["Yes, there is.", "There is no dog. No.", "No", "NO", "Yes"]
    records = [task_utils.pope_process_results(d, [a])["accuracy"] for d, a in zip(docs, answers)]
    assert [r["parsed"] for r in records] == ["yes", "no", "no", "yes", "yes"]
    # By hand: tp 1, fn 1, tn 1, fp 2; the predictions' yes-ratio is 60 (the labels' is 40).
    assert task_utils.pope_accuracy(records) == pytest.approx(40.0)
    assert task_utils.pope_precision(records) == pytest.approx(100 / 3)
    assert task_utils.pope_recall(records) == pytest.approx(50.0)
    assert task_utils.pope_f1(records) == pytest.approx(40.0)
    assert task_utils.pope_yes_ratio(records) == pytest.approx(60.0)
    assert task_utils._prompt("Is there a cat in the image?", {"pre_prompt": "Q: ", "post_prompt": " A:"}) \
        == "Q: Is there a cat in the image? A:"
