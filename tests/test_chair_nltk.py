"""Exact CHAIR with NLTK's data: the 12 released OPERA logs give the reference table; setup and fallbacks.

The NLTK data (the averaged-perceptron tagger and WordNet 3.0) come from ../shared/data/nltk: scripts/test.sh
installs them into .nltk_data and exports NLTK_DATA; a bare pytest run installs them into a temporary folder.
Under CI=true a missing data folder fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest

from vlmscope.errors import InputError
from vlmscope.eval import chair, nltk_backend
from vlmscope.eval.chair import chair_scores, get_normaliser, load_captions, load_gt_objects

SHARED = Path(os.environ.get("VLMSCOPE_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared") / "data"

# ../shared/data/README.md: CHAIR_S / CHAIR_I of the reference chair.py with real NLTK (the OPERA paper's
# Table 1 wherever it has the row).
REFERENCE_TABLE = {
    "llava15": {"greedy": (45.0, 12.7), "beam5": (48.8, 13.9), "opera": (44.6, 12.8)},
    "instructblip": {"greedy": (58.8, 23.7), "beam5": (55.6, 15.8), "opera": (46.4, 14.2)},
    "minigpt4": {"greedy": (31.8, 9.9), "beam5": (30.6, 9.5), "opera": (26.2, 9.5)},
    "shikra": {"greedy": (55.8, 15.4), "beam5": (50.4, 13.3), "opera": (36.2, 12.1)},
}


def _need(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is missing: CI must provide ../shared/data beside the repository")
        pytest.skip(f"{path} not present (CI provides it beside the repository)")
    return path


@pytest.fixture(scope="session")
def nltk_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    import nltk

    if not nltk_backend.nltk_status().available:
        source = _need(SHARED / "nltk")
        dest = tmp_path_factory.mktemp("nltk_data")
        nltk_backend.install_data(source, dest)
        os.environ["NLTK_DATA"] = str(dest)  # for the CLI subprocesses
    status = nltk_backend.nltk_status()
    assert status.available, status.missing
    return str(nltk.data.path[0])


@pytest.fixture(scope="module")
def gt() -> dict[int, frozenset[str]]:
    return load_gt_objects()


@pytest.mark.parametrize("model", sorted(REFERENCE_TABLE))
def test_released_logs_give_the_reference_table(model: str, nltk_data: str, gt) -> None:
    for decoding, (chair_s, chair_i) in REFERENCE_TABLE[model].items():
        captions = load_captions(_need(SHARED / "chair" / f"{model}_{decoding}_captions.jsonl"))
        result = chair_scores(captions, gt, normaliser="auto")
        assert result.settings["normaliser"] == "nltk"
        assert "perceptron tagger" in result.settings["normaliser_detail"]
        assert round(result.metrics["CHAIR_S"], 1) == pytest.approx(chair_s, abs=0.1001), decoding
        assert round(result.metrics["CHAIR_I"], 1) == pytest.approx(chair_i, abs=0.1001), decoding


def test_pos_dependent_lemmas_of_the_issue(nltk_data: str) -> None:
    norm = get_normaliser("nltk")
    # "tied" (VBN) → tie, "seated" (VBN) → seat → chair, "stove" as a noun → oven.
    assert chair.caption_to_objects("a dog is tied to a pole .", normaliser=norm).node_words == ["dog", "tie"]
    assert chair.caption_to_objects("a man is seated on a bench .", normaliser=norm).node_words == ["person", "chair", "bench"]
    assert chair.caption_to_objects("a pot sits on the stove .", normaliser=norm).node_words == ["oven"]
    # nltk 3.8.1's morphy keeps applying the rules when one step finds nothing: "carss" → "cars" → "car".
    assert norm("carss")[1] == ["car"]


def test_stock_nltk_reads_the_converted_tagger(nltk_data: str) -> None:
    import nltk
    from nltk.tag.perceptron import PerceptronTagger

    tokens = nltk.tokenize.NLTKWordTokenizer().tokenize("a man is seated on a chair next to a stove")
    stock = PerceptronTagger().tag(tokens)  # NLTK's own JSON loader on the files setup wrote
    with open(_need(SHARED / "nltk" / "averaged_perceptron_tagger.zip"), "rb") as fh:
        import io
        import zipfile

        data = zipfile.ZipFile(io.BytesIO(fh.read())).read("averaged_perceptron_tagger/averaged_perceptron_tagger.pickle")
    weights, tagdict, classes = nltk_backend.read_tagger_pickle(data)
    from_pickle = PerceptronTagger(load=False)
    from_pickle.model.weights, from_pickle.tagdict = weights, tagdict
    from_pickle.classes = from_pickle.model.classes = set(classes)
    assert stock == from_pickle.tag(tokens)
    assert dict(stock)["seated"] == "VBN"


def test_tagger_pickle_reader_runs_no_code() -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        nltk_backend.read_tagger_pickle(pickle.dumps(({}, {}, Evil())))


def test_auto_falls_back_to_builtin_and_says_so(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    missing = nltk_backend.NltkStatus("3.10", None, False, "untrained-punkt", ("averaged_perceptron_tagger_eng", "wordnet"))
    monkeypatch.setattr(nltk_backend, "nltk_status", lambda: missing)
    chair._announce_fallback.cache_clear()
    with caplog.at_level("WARNING", logger="vlmscope"):
        assert get_normaliser("auto") is chair.builtin_normaliser
        get_normaliser("auto")
    lines = [r.getMessage() for r in caplog.records if "NLTK data not found" in r.getMessage()]
    assert len(lines) == 1 and "vlmscope chair setup" in lines[0]
    with pytest.raises(InputError, match="chair setup"):
        get_normaliser("nltk")


def _cli(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    # In-process (a subprocess would spend seconds importing torch); same exit codes and streams.
    from vlmscope.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_cli_setup_from_folder_and_exact_json(tmp_path: Path, nltk_data: str, capsys: pytest.CaptureFixture) -> None:
    dest = tmp_path / "nd"
    proc = _cli(capsys, "chair", "setup", "--from", str(_need(SHARED / "nltk")), "--dest", str(dest), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)  # --json: only JSON on stdout
    assert record["available"] and "averaged_perceptron_tagger_eng (converted from the pickle)" in record["installed"]
    assert sorted(p.name for p in (dest / "taggers" / "averaged_perceptron_tagger_eng").iterdir()) == sorted(
        nltk_backend.TAGGER_JSON_FILES
    )
    captions = _need(SHARED / "chair" / "minigpt4_beam5_captions.jsonl")
    proc = _cli(capsys, "chair", "--captions", str(captions), "--json", "--bootstrap", "200", "--protocol", "opera-500")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (round(out["CHAIR_S"], 1), round(out["CHAIR_I"], 1)) == (30.6, 9.5)
    assert out["normaliser"] == "nltk" and out["protocol"] == "opera-500"
    low, high = out["intervals"]["CHAIR_S"]
    assert low < out["CHAIR_S"] < high
    assert "nltk normaliser" in proc.stderr and "95% interval" in proc.stderr


def test_cli_setup_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    proc = _cli(capsys, "chair", "setup", "--from", str(tmp_path / "nowhere"), "--dest", str(tmp_path / "d"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = _cli(capsys, "chair", "setup", "--from", str(tmp_path / "empty"), "--dest", str(tmp_path / "d2"))
    assert proc.returncode == 2 and "averaged_perceptron_tagger" in proc.stderr


@pytest.mark.slow
def test_builtin_tokens_equal_nltk_tokens_on_all_logs(nltk_data: str) -> None:
    from vlmscope.eval.tokenize import word_tokenize

    reference = get_normaliser("nltk").tokenize
    differ = []
    for path in sorted((SHARED / "chair").glob("*_captions.jsonl")):
        for rec in load_captions(path):
            if word_tokenize(rec["caption"].lower()) != reference(rec["caption"]):
                differ.append(rec["caption"][:60])
    assert len(list((SHARED / "chair").glob("*_captions.jsonl"))) == 12
    assert differ == []


def test_hand_written_rule_cases_hold_for_the_reference(nltk_data: str) -> None:
    # The builtin's rule table (tests/test_chair.py) states the reference behaviour: check it on the oracle.
    from test_chair import RULE_CASES

    norm = get_normaliser("nltk")
    wrong = [(c, e, chair.caption_to_objects(c, normaliser=norm).node_words) for c, e in RULE_CASES
             if chair.caption_to_objects(c, normaliser=norm).node_words != e]
    assert wrong == []


@pytest.mark.slow
def test_shipped_builtin_agrees_with_nltk_on_the_12_logs(nltk_data: str, gt: dict[int, frozenset[str]]) -> None:
    # README / bench_chair.py 2a: the shipped model (fitted on these logs) gives the exact normaliser's mentions
    # on 5,989 of the 6,000 captions, and every log's CHAIR_S / CHAIR_I to 0.0 points.
    exact = get_normaliser("nltk")
    same = total = 0
    worst_gap = 0.0
    for path in sorted((SHARED / "chair").glob("*_captions.jsonl")):
        captions = load_captions(path)
        for rec in captions:
            total += 1
            same += (chair.caption_to_objects(rec["caption"], normaliser=exact).node_words
                     == chair.caption_to_objects(rec["caption"], normaliser="builtin").node_words)
        ref = chair_scores(captions, gt, normaliser=exact).metrics
        ours = chair_scores(captions, gt, normaliser="builtin").metrics
        worst_gap = max(worst_gap, *(abs(round(ours[k], 1) - round(ref[k], 1)) for k in ("CHAIR_S", "CHAIR_I")))
    assert total == 6000
    assert same >= 5989
    assert worst_gap <= 0.05
