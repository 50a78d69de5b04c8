"""Frozen protocols: the OPERA image ids, POPE question sets by fingerprint and shape, CLI checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vlmscope.cli import main
from vlmscope.errors import InputError
from vlmscope.eval.pope import load_questions
from vlmscope.eval.protocols import (
    PROTOCOLS,
    bundled_pope_file,
    check_pope_questions,
    get_protocol,
    protocol_image_ids,
    questions_fingerprint,
)

SHARED = Path(os.environ.get("VLMSCOPE_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared") / "data"


def _shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is missing: CI provides ../shared/data beside the repository")
        pytest.skip(f"{path} not present")
    return path


def test_opera_500_ids_are_those_of_the_released_logs() -> None:
    ids = protocol_image_ids(get_protocol("opera-500"))
    assert len(ids) == 500 == len(set(ids))
    assert protocol_image_ids(get_protocol("opera-500-64")) == ids
    for model in ("llava15", "minigpt4", "shikra"):
        for decoding in ("greedy", "beam5", "opera"):
            path = _shared(f"chair/{model}_{decoding}_captions.jsonl")
            logged = [json.loads(line)["image_id"] for line in path.read_text().splitlines()]
            assert set(logged) == set(ids)
    greedy = _shared("chair/llava15_greedy_captions.jsonl").read_text().splitlines()
    assert [json.loads(line)["image_id"] for line in greedy] == ids  # protocol order = the log's order
    record = get_protocol("opera-500-64").record()
    assert record == {"name": "opera-500-64", "task": "chair", "num_images": 500,
                      "prompt": "Please describe this image in detail.", "max_new_tokens": 64,
                      "truncate_incomplete": True}


def test_pope_protocols_check_their_questions(tmp_path: Path) -> None:
    protocol = get_protocol("pope-coco")
    splits = {s: load_questions(bundled_pope_file(s)) for s in ("random", "popular", "adversarial")}
    check_pope_questions(protocol, splits)  # the shipped files are the protocol's
    # The shipped files are the official HEAD files in ../shared/data/pope (the fingerprint is content-only).
    for split in splits:
        official = load_questions(_shared(f"pope/coco_pope_{split}.jsonl"))
        assert questions_fingerprint(official) == protocol.fingerprints[split]
    edited = [dict(q) for q in splits["random"]]
    edited[7]["text"] = edited[7]["text"].replace("image", "imange")
    with pytest.raises(InputError, match="differ from protocol pope-random"):
        check_pope_questions(get_protocol("pope-random"), {"random": edited})
    with pytest.raises(InputError, match="has 3000 random questions, the file has 2999"):
        check_pope_questions(get_protocol("pope-random"), {"random": splits["random"][:-1]})
    with pytest.raises(InputError, match="split"):
        check_pope_questions(protocol, {"random": splits["random"]})


def test_llava_2910_subset_is_named_and_shape_checked() -> None:
    protocol = get_protocol("pope-random-llava-2910")
    yes = [{"question_id": i, "image": f"{i}.jpg", "text": "?", "label": "yes"} for i in range(1500)]
    no = [{"question_id": 1500 + i, "image": f"{i}.jpg", "text": "?", "label": "no"} for i in range(1410)]
    check_pope_questions(protocol, {"random": yes + no})
    with pytest.raises(InputError, match="2910"):
        check_pope_questions(protocol, {"random": load_questions(bundled_pope_file("random"))})
    assert protocol.record()["questions_per_split"] == 2910


def test_unknown_protocol_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match="opera-500, opera-500-64"):
        get_protocol("opera-5000", "chair")
    with pytest.raises(InputError, match="unknown pope protocol 'opera-500'"):
        get_protocol("opera-500", "pope")
    assert {p.task for p in PROTOCOLS.values()} == {"chair", "pope"}


def test_cli_protocol_checks(tmp_path: Path, capsys) -> None:
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 139, "caption": "a dog ."}) + "\n")
    assert main(["chair", "--captions", str(caps), "--protocol", "opera-500", "--save", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "covers 0 of protocol opera-500's 500 images" in err
    assert not (tmp_path / "s.json").exists()  # nothing written on bad input
    # eval refuses options the protocol fixes, before loading any model
    assert main(["eval", "chair", "--model", "no-such-model", "--protocol", "opera-500", "--prompt", "x",
                 "--data-path", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "--protocol opera-500 fixes --prompt" in capsys.readouterr().err
    answers = tmp_path / "answers.jsonl"
    questions = load_questions(bundled_pope_file("popular"))
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "text": "Yes"}) + "\n" for q in questions))
    assert main(["pope", "score", "--answers", str(answers), "--questions", str(bundled_pope_file("popular")),
                 "--protocol", "pope-popular", "--bootstrap", "50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "pope-popular" and out["splits"]["popular"]["Yes_ratio"] == 100.0
    assert out["intervals"]["popular/Accuracy"] == [50.0, 50.0]  # every image has 3 yes and 3 no questions


def test_cli_64_token_protocol_truncates(tmp_path: Path, capsys) -> None:
    log = _shared("chair/llava15_greedy_captions.jsonl")
    save = tmp_path / "out.json"
    assert main(["chair", "--captions", str(log), "--protocol", "opera-500-64", "--normaliser", "builtin",
                 "--bootstrap", "0", "--save", str(save)]) == 0
    saved = json.loads(save.read_text())
    assert saved["settings"]["truncate_incomplete"] is True
    assert saved["settings"]["protocol"]["name"] == "opera-500-64"
    assert "intervals" not in saved
