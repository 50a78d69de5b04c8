"""Functions of vlmscope's lmms-eval tasks (the YAML files next to this module name them as `!function utils.x`).

lmms-eval loads this file by its path, as a module named `utils` (once per `!function`), so it imports vlmscope
absolutely and shares no state between functions: every function works from its arguments alone. The metrics
are computed in the aggregations, over all the run's answers at once, by vlmscope's own scorers.

Images come from the folder an environment variable names (`IMAGE_DIR_VARIABLES`). lmms-eval's CLI logs an
evaluation error as one line and exits 0, so a missing variable or image raises `InputError` whose message names
the variable and what the folder must hold; it appears in that line ("Error during evaluation: ...").
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError

# The image folder of each dataset. A-OKVQA's POPE images are MSCOCO val2014 images under their COCO names.
IMAGE_DIR_VARIABLES = {"coco": "VLMSCOPE_COCO_DIR", "aokvqa": "VLMSCOPE_COCO_DIR", "gqa": "VLMSCOPE_GQA_DIR",
                       "amber": "VLMSCOPE_AMBER_DIR"}
IMAGE_FOLDER_CONTENTS = {
    "VLMSCOPE_COCO_DIR": "MSCOCO val2014 images (COCO_val2014_<12-digit id>.jpg)",
    "VLMSCOPE_GQA_DIR": "GQA images (<Visual Genome id>.jpg, from GQA's images.zip)",
    "VLMSCOPE_AMBER_DIR": "AMBER images (AMBER_<id>.jpg, from AMBER's image download)",
}
# vlmscope's default POPE rule (POPE's and LLaVA's own parser); the task YAML records it as `pope_answer_rule`.
POPE_RULE = "official"
# `vlmscope eval amber`'s defaults; the task YAMLs record them as `amber_parser` / `amber_similarity`.
AMBER_PARSER = "reference"
AMBER_SIMILARITY = "auto"
POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
AMBER_GENERATIVE_METRICS = {"chair": "CHAIR", "cover": "Cover", "hal": "Hal", "cog": "Cog"}
AMBER_DISCRIMINATIVE_METRICS = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1",
                                "yes_ratio": "Yes_ratio", "existence_f1": "existence/F1",
                                "attribute_f1": "attribute/F1", "relation_f1": "relation/F1"}


def image_folder(variable: str) -> Path:
    """The folder the environment variable names; `InputError` naming the variable when unset or not a folder."""
    holds = IMAGE_FOLDER_CONTENTS[variable]
    value = os.environ.get(variable, "").strip()
    if not value:
        raise InputError(f"{variable} is not set; set it to the folder holding {holds}")
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise InputError(f"{variable}={value} is not a folder; set {variable} to the folder holding {holds}")
    return folder


def load_image(variable: str, name: str) -> Any:
    """The RGB image `name` from the folder of `variable`."""
    from PIL import Image

    path = image_folder(variable) / name
    if not path.is_file():
        raise InputError(f"image not found: {path}; set {variable} to the folder holding "
                         f"{IMAGE_FOLDER_CONTENTS[variable]}")
    with Image.open(path) as image:
        return image.convert("RGB")


# The folder is checked by each task's doc_to_text: lmms-eval calls it on the first document when it builds the
# task, before any request runs, and an error there reaches its log as it is ("Error during evaluation: <the
# message>"; a `process_docs` error would be retried five times and then logged as a bare tenacity RetryError).
# Images are checked one by one as documents are answered, since `--limit` runs need only the first few.
def doc_to_visual_amber(doc: Mapping[str, Any]) -> list[Any]:
    return [load_image("VLMSCOPE_AMBER_DIR", doc["image"])]


def doc_to_visual_coco(doc: Mapping[str, Any]) -> list[Any]:
    return [load_image("VLMSCOPE_COCO_DIR", doc["image"])]


def doc_to_visual_gqa(doc: Mapping[str, Any]) -> list[Any]:
    return [load_image("VLMSCOPE_GQA_DIR", doc["image"])]


# ------------------------------------------------------------------------------------------------------------
# POPE


def _prompt(question: str, lmms_eval_specific_kwargs: Mapping[str, Any] | None) -> str:
    """The question between the task's `pre_prompt` and `post_prompt` (both empty in the shipped tasks)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{question}{kwargs.get('post_prompt', '')}"


def pope_doc_to_text_coco(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """The POPE question (MSCOCO and A-OKVQA tasks: their images are in VLMSCOPE_COCO_DIR)."""
    image_folder("VLMSCOPE_COCO_DIR")
    return _prompt(doc["text"], lmms_eval_specific_kwargs)


def pope_doc_to_text_gqa(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """The POPE question (GQA tasks: their images are in VLMSCOPE_GQA_DIR)."""
    image_folder("VLMSCOPE_GQA_DIR")
    return _prompt(doc["text"], lmms_eval_specific_kwargs)


def pope_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One record per metric (the same for all): the answer with what scoring needs. The metrics are computed
    over the whole run in the aggregations, so each record only carries the answer and its question."""
    from vlmscope.eval.pope import parse_answer

    answer = results[0]
    label = str(doc["label"]).strip().lower()
    record = {"question_id": doc["question_id"], "image": doc["image"], "label": label, "answer": answer,
              # For the samples log only; the aggregation parses the answer again through pope_scores.
              "parsed": parse_answer(answer, POPE_RULE, label), "rule": POPE_RULE}
    return {metric: record for metric in POPE_METRICS}


def pope_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`vlmscope.eval.pope.pope_scores` of the run's answers against their questions (one split: a task is one)."""
    from vlmscope.eval.pope import pope_scores

    answers = [{"question_id": r["question_id"], "answer": r["answer"]} for r in records]
    questions = [{"question_id": r["question_id"], "image": r["image"], "label": r["label"]} for r in records]
    return pope_scores(answers, questions, rule=POPE_RULE)["splits"]["all"]


def pope_accuracy(records: Sequence[Mapping[str, Any]]) -> float:
    return pope_metrics(records)["Accuracy"]


def pope_precision(records: Sequence[Mapping[str, Any]]) -> float:
    return pope_metrics(records)["Precision"]


def pope_recall(records: Sequence[Mapping[str, Any]]) -> float:
    return pope_metrics(records)["Recall"]


def pope_f1(records: Sequence[Mapping[str, Any]]) -> float:
    return pope_metrics(records)["F1"]


def pope_yes_ratio(records: Sequence[Mapping[str, Any]]) -> float:
    return pope_metrics(records)["Yes_ratio"]


# ------------------------------------------------------------------------------------------------------------
# AMBER


def amber_doc_to_text(doc: Mapping[str, Any], lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """The AMBER query as written."""
    image_folder("VLMSCOPE_AMBER_DIR")
    return _prompt(doc["query"], lmms_eval_specific_kwargs)


_SCORING_CHECKED: list[bool] = []  # per loaded copy of this module: lmms-eval loads one per `!function`


def amber_doc_to_text_generative(doc: Mapping[str, Any],
                                 lmms_eval_specific_kwargs: Mapping[str, Any] | None = None) -> str:
    """The AMBER query, once it is known that descriptions can be scored (NLTK data, the similarity step):
    refused before any description is generated, not after."""
    if not _SCORING_CHECKED:
        from vlmscope.eval.amber import check_scoring

        check_scoring([{"id": 1}], AMBER_SIMILARITY)
        _SCORING_CHECKED.append(True)
    return amber_doc_to_text(doc, lmms_eval_specific_kwargs)


def amber_process_results_generative(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
    record = {"id": int(doc["id"]), "response": results[0]}
    return {metric: record for metric in AMBER_GENERATIVE_METRICS}


def amber_process_results_discriminative(doc: Mapping[str, Any], results: Sequence[str]) -> dict[str, dict[str, Any]]:
    from vlmscope.eval.amber import parse_answer

    # `parsed` is for the samples log only; the aggregation parses the response again in amber_scores.
    record = {"id": int(doc["id"]), "response": results[0], "parsed": parse_answer(results[0], AMBER_PARSER),
              "parser": AMBER_PARSER}
    return {metric: record for metric in AMBER_DISCRIMINATIVE_METRICS}


def amber_metrics(records: Sequence[Mapping[str, Any]], task: str) -> dict[str, Any]:
    """`vlmscope.eval.amber.amber_scores` of the run's responses: one pass over all of them, so the
    reference's counters start at 0.001 once per run (lmms-eval's amber_g restarts them per document)."""
    return _amber_result(tuple((int(r["id"]), r["response"]) for r in records), task).metrics


@functools.lru_cache(maxsize=2)
def _amber_result(responses: tuple[tuple[int, str], ...], task: str) -> Any:
    # Each metric is its own lmms-eval aggregation over the same records: score the run once, not per metric
    # (the generative pass tags every description).
    from vlmscope.eval.amber import amber_scores

    rows = [{"id": item_id, "response": response} for item_id, response in responses]
    return amber_scores(rows, task=task, parser=AMBER_PARSER, similarity=AMBER_SIMILARITY)


# The aggregations' names must not contain "amber_": lmms-eval 0.7.3 (api/metrics.py stderr_for_metric) then
# bootstraps them, re-scoring the run 100,000 times on documents drawn with replacement, whose repeated ids
# amber_scores refuses.
def generative_chair(records: Sequence[Mapping[str, Any]]) -> float | None:
    result = _amber_result(tuple((int(r["id"]), r["response"]) for r in records), "generative")
    # lmms-eval's results keep numbers only: whether the similarity step ran is said here, in its log.
    print(f"vlmscope_amber_generative: {len(records)} descriptions, nouns: {result.settings['nouns']}; "
          f"similarity step: {result.settings['similarity']}", file=sys.stderr)
    return result.metrics["CHAIR"]


def generative_cover(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "generative")["Cover"]


def generative_hal(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "generative")["Hal"]


def generative_cog(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "generative")["Cog"]


def discriminative_accuracy(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "discriminative")["Accuracy"]


def discriminative_precision(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "discriminative")["Precision"]


def discriminative_recall(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "discriminative")["Recall"]


def discriminative_f1(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "discriminative")["F1"]


def discriminative_yes_ratio(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "discriminative")["Yes_ratio"]


def discriminative_existence_f1(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "discriminative")["existence/F1"]


def discriminative_attribute_f1(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "discriminative")["attribute/F1"]


def discriminative_relation_f1(records: Sequence[Mapping[str, Any]]) -> float | None:
    return amber_metrics(records, "discriminative")["relation/F1"]
