"""Frozen evaluation protocols: which images or questions, which prompt, how many tokens — by name.

A protocol pins everything that makes two CHAIR or POPE numbers comparable; every run records the protocol's
name and fingerprint (``settings["protocol"]``) and ``vlmscope compare`` refuses to pair runs of different
protocols unless told to.

CHAIR (reference/chair.md §7):
- ``opera-500``: the 500 COCO val2014 images of OPERA's released LLaVA-1.5 / MiniGPT-4 / Shikra caption logs
  (shikiw/OPERA: log/chair_eval_results/, in the order of the LLaVA-1.5 greedy log), prompt "Please describe
  this image in detail.", 512 new tokens, captions scored as they are.
- ``opera-500-64``: the same images and prompt, 64 new tokens, and the last incomplete sentence dropped before
  scoring (OPERA's 64-token setting, shikiw/OPERA#30).

POPE (reference/pope.md):
- ``pope-random`` / ``pope-popular`` / ``pope-adversarial``: the official COCO splits, 3,000 questions each
  (AoiDragon/POPE HEAD: 500 images × 6 questions, typos fixed; shipped with vlmscope); ``pope-coco`` is all
  three, scored side by side. A question file given with these protocols must hold exactly these questions.
- ``pope-random-llava-2910``: the initially released random split with 2,910 questions (1,500 yes / 1,410 no,
  the same 500 images) that LLaVA-1.5 and OPERA evaluated on. It is not shipped (its origin is unverified);
  pass the file with ``--questions`` and it is checked for that shape, so that results on it are never labelled
  as the 3,000-question split.
- ``pope-aokvqa-random`` / ``-popular`` / ``-adversarial`` / ``pope-aokvqa`` and ``pope-gqa-*`` / ``pope-gqa``: the
  POPE sets on A-OKVQA (COCO val2014 images) and GQA (Visual Genome images) that VCD and later papers use,
  3,000 questions per split (500 images × 6, objects from SEEM segmentation; DAMO-NLP-SG/VCD
  experiments/data/POPE/, the same questions as AoiDragon/POPE output/seem/; shipped with vlmscope). Their splits
  are named with the dataset (``aokvqa-random``, ...) in questions, answers and metrics, so that no A-OKVQA or
  GQA number can be read as a COCO one.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError

__all__ = [
    "POPE_FINGERPRINTS",
    "PROTOCOLS",
    "Protocol",
    "check_pope_questions",
    "get_protocol",
    "identify_pope_questions",
    "protocol_image_ids",
    "questions_fingerprint",
]

DETAIL_PROMPT = "Please describe this image in detail."


@dataclass(frozen=True)
class Protocol:
    """One frozen evaluation setting (see the module docstring)."""

    name: str
    task: str  # "chair" or "pope"
    description: str
    image_ids_file: str | None = None  # CHAIR: package data file with one image id per line
    prompt: str | None = None
    max_new_tokens: int | None = None
    truncate_incomplete: bool = False
    splits: tuple[str, ...] = ()  # POPE: bundled split files
    questions_per_split: int | None = None
    label_counts: Mapping[str, int] = field(default_factory=dict)  # POPE: expected yes/no counts per split
    fingerprints: Mapping[str, str] = field(default_factory=dict)  # POPE: split → `questions_fingerprint`
    dataset: str = "coco"  # POPE: whose images; splits of other datasets are named "<dataset>-<split>"

    def record(self) -> dict[str, Any]:
        """What a run stores under ``settings["protocol"]``."""
        out: dict[str, Any] = {"name": self.name, "task": self.task}
        if self.task == "chair":
            out.update(num_images=len(protocol_image_ids(self)), prompt=self.prompt,
                       max_new_tokens=self.max_new_tokens, truncate_incomplete=self.truncate_incomplete)
        else:
            out.update(splits=list(self.splits), questions_per_split=self.questions_per_split)
            if self.fingerprints:
                out["fingerprints"] = dict(self.fingerprints)
            if self.dataset != "coco":  # COCO records stay as they were, so that older runs still resume
                out["dataset"] = self.dataset
        return out


_CHAIR = dict(image_ids_file="protocols/opera_500_image_ids.txt", prompt=DETAIL_PROMPT)
_POPE3000: dict[str, Any] = dict(questions_per_split=3000, label_counts={"yes": 1500, "no": 1500})

# sha256 of the canonical question tuples of the shipped files (see `questions_fingerprint`), per dataset and split.
POPE_FINGERPRINTS: dict[str, dict[str, str]] = {
    "coco": {
        "random": "061350aa606c9087842b43c26a40e4841415426ebcde36c2eb950e3d4414b3f5",
        "popular": "6e1418036acdc35b6412cd47f5265b7f037dc3f589e1a4b6b2a67f6d7f669d98",
        "adversarial": "cc286b97a0e2f60c5dd0f3c5d9d28b1b5c569ee9a927470220660a8d7bc59ed5",
    },
    "aokvqa": {
        "random": "ced51d06921eaddc9f478e1a36a4fa911200f132120fc8ff6ffe6e5e3e74ed85",
        "popular": "a2253d478ae555d69edffef62c5ff18257774be7d663453e00de0fdc05ced0e3",
        "adversarial": "777293da35194c9ee2f0957172eeff46c76bebc115f426c48090b3afed5d23d5",
    },
    "gqa": {
        "random": "13a70a74f73ef62b918fbe3d2751b7017debde6f44e19a39092d0e1f0c1f1d9a",
        "popular": "f7d0ef6f44a79f914f2baae72ecf14251c49beb1af472a9a8febbbd80ce862b8",
        "adversarial": "b5f92ca640cbf82a3b40a95cda24f24be6a220a062eb0fd014e45b5cd75ffc51",
    },
}
_POPE_FINGERPRINTS = POPE_FINGERPRINTS["coco"]
_DATASET_TITLES = {"aokvqa": "A-OKVQA (COCO val2014 images)", "gqa": "GQA (Visual Genome images)"}


def _split_label(dataset: str, split: str) -> str:
    # The one naming rule (also `vlmscope.eval.pope.split_label`): COCO splits keep their plain names.
    return split if dataset == "coco" else f"{dataset}-{split}"


def _dataset_protocols(dataset: str) -> list[Protocol]:
    title = _DATASET_TITLES[dataset]
    prints = {_split_label(dataset, s): fp for s, fp in POPE_FINGERPRINTS[dataset].items()}
    singles = [Protocol(f"pope-{dataset}-{s}", "pope", f"POPE {title} {s} split (SEEM objects; VCD's file), 3,000 "
                        "questions", splits=(label,), fingerprints={label: prints[label]}, dataset=dataset,
                        **_POPE3000)
               for s, label in zip(POPE_FINGERPRINTS[dataset], prints)]
    whole = Protocol(f"pope-{dataset}", "pope", f"POPE {title} random + popular + adversarial, 3,000 questions "
                     "each", splits=tuple(prints), fingerprints=prints, dataset=dataset, **_POPE3000)
    return [*singles, whole]


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("opera-500", "chair", "OPERA's 500 val2014 images, detail prompt, 512 new tokens",
                 max_new_tokens=512, **_CHAIR),
        Protocol("opera-500-64", "chair", "OPERA's 500 val2014 images, detail prompt, 64 new tokens, "
                 "last incomplete sentence dropped", max_new_tokens=64, truncate_incomplete=True, **_CHAIR),
        *(
            Protocol(f"pope-{s}", "pope", f"official POPE COCO {s} split, 3,000 questions", splits=(s,),
                     fingerprints={s: _POPE_FINGERPRINTS[s]}, **_POPE3000)
            for s in ("random", "popular", "adversarial")
        ),
        Protocol("pope-coco", "pope", "official POPE COCO random + popular + adversarial, 3,000 questions each",
                 splits=("random", "popular", "adversarial"), fingerprints=_POPE_FINGERPRINTS, **_POPE3000),
        Protocol("pope-random-llava-2910", "pope", "the initial 2,910-question POPE random split used by "
                 "LLaVA-1.5 and OPERA (not shipped; pass it with --questions)", splits=("random",),
                 questions_per_split=2910, label_counts={"yes": 1500, "no": 1410}),
        *_dataset_protocols("aokvqa"),
        *_dataset_protocols("gqa"),
    )
}  # fmt: skip


def get_protocol(name: str, task: str | None = None) -> Protocol:
    """The protocol called `name` (for `task` if given); `InputError` listing the known ones otherwise."""
    known = [p for p in PROTOCOLS.values() if task is None or p.task == task]
    if name not in PROTOCOLS or PROTOCOLS[name] not in known:
        raise InputError(f"unknown {task + ' ' if task else ''}protocol {name!r}; use one of {', '.join(p.name for p in known)}")
    return PROTOCOLS[name]


def _data_file(name: str) -> Any:
    return resources.files("vlmscope").joinpath("data", name)


def protocol_image_ids(protocol: Protocol) -> list[int]:
    """The CHAIR protocol's image ids, in protocol order."""
    if protocol.image_ids_file is None:
        raise InputError(f"protocol {protocol.name} is not a CHAIR protocol; use opera-500 or opera-500-64")
    return [int(line) for line in _data_file(protocol.image_ids_file).read_text(encoding="utf-8").split()]


def bundled_pope_file(split: str, dataset: str = "coco") -> Path:
    """Path of the shipped question file of `dataset`'s `split` (random, popular or adversarial)."""
    return Path(str(_data_file(f"pope/{dataset}_pope_{split}.jsonl")))


def identify_pope_questions(questions: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """``(dataset, split)`` of the shipped set these questions are (by fingerprint, so any formatting), or None."""
    fingerprint = questions_fingerprint(questions)
    for dataset, prints in POPE_FINGERPRINTS.items():
        for split, expected in prints.items():
            if fingerprint == expected:
                return dataset, split
    return None


def questions_fingerprint(questions: Iterable[Mapping[str, Any]]) -> str:
    """sha256 over the (question_id, image, text, label) of each question, in order (formatting-independent)."""
    digest = hashlib.sha256()
    for q in questions:
        row = [q.get("question_id"), q.get("image"), q.get("text"), str(q.get("label")).strip().lower()]
        digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def check_pope_questions(protocol: Protocol, questions_by_split: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Refuse question sets that are not the protocol's (`InputError` saying what differs)."""
    if sorted(questions_by_split) != sorted(protocol.splits):
        raise InputError(f"protocol {protocol.name} is the split(s) {', '.join(protocol.splits)}, got "
                         f"{', '.join(sorted(questions_by_split))}; pass those question files or another protocol")
    for split, questions in questions_by_split.items():
        if len(questions) != protocol.questions_per_split:
            raise InputError(f"protocol {protocol.name} has {protocol.questions_per_split} {split} questions, the file "
                             f"has {len(questions)}; pass the protocol's question file")
        labels = Counter(str(q.get("label")).strip().lower() for q in questions)
        if protocol.label_counts and dict(labels) != dict(protocol.label_counts):
            raise InputError(f"protocol {protocol.name} has {dict(protocol.label_counts)} {split} labels, the file "
                             f"has {dict(labels)}; pass the protocol's question file")
        expected = protocol.fingerprints.get(split)
        if expected and questions_fingerprint(questions) != expected:
            source = "the official HEAD file" if protocol.dataset == "coco" else "the file"
            raise InputError(f"the {split} questions differ from protocol {protocol.name}'s ({source} shipped with "
                             "vlmscope); pass that file or run without --protocol")
