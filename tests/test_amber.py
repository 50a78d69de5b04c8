"""AMBER scoring: equal to the reference inference.py (fixtures), hand-computed baselines, parsers, data.

The fixture tests/data/parity/amber/reference.json holds what the reference printed on the crafted responses
(tools/parity/amber/regenerate.sh: run unmodified under nltk 3.8.1 with a spaCy stand-in). The NLTK data
(tagger, WordNet) come from ../shared/data/nltk as in test_chair_nltk.py.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from vlmscope.errors import InputError
from vlmscope.eval import amber
from vlmscope.eval.amber import TableSimilarity, amber_queries, amber_scores, load_amber_data, parse_answer

PARITY = Path(__file__).parent / "data" / "parity" / "amber"
# The reference's printed section → our group.
SECTIONS = {"Generative Task": "generative", "Descriminative Task": "discriminative", "Exsitence": "existence",
            "Attribute": "attribute", "State": "state", "Number": "number", "Action": "action", "Relation": "relation"}




def _reference() -> dict:
    return json.loads((PARITY / "reference.json").read_text(encoding="utf-8"))


def _responses(name: str = "responses.json") -> list[dict]:
    return json.loads((PARITY / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("run, responses, similarity, parser", [
    ("zero", "responses.json", "skip", "reference"),
    ("table", "responses.json", "table", "reference"),
    ("lenient", "responses.json", "skip", "lenient"),  # the reference saw the answers normalised beforehand
])
def test_scores_equal_the_reference_printout(nltk_data, run, responses, similarity, parser) -> None:
    sim = TableSimilarity.from_file(PARITY / "similarity_table.json") if similarity == "table" else similarity
    result = amber_scores(_responses(responses), "all", parser, sim)
    printed = _reference()["runs"][run]["metrics"]
    assert set(printed) == set(SECTIONS)
    for section, values in printed.items():
        ours = result.groups[SECTIONS[section]]
        assert {k: ours[k] for k in values} == values, section
    assert result.metrics["AMBER_Score"] == round((100 - printed["Generative Task"]["CHAIR"]
                                                   + printed["Descriminative Task"]["F1"]) / 2, 2)


def test_the_fixture_exercises_every_branch(nltk_data) -> None:
    """The crafted responses reach each step: covered via association, exact hallu, similarity, safe words."""
    table = TableSimilarity.from_file(PARITY / "similarity_table.json")
    skipped = amber_scores(_responses(), "generative", similarity="skip")
    similar = amber_scores(_responses(), "generative", similarity=table)
    assert skipped.groups["generative"] != similar.groups["generative"]
    data = load_amber_data()
    gen = [it for it in skipped.items if it["type"] == "generative"]
    assert any(set(it["nouns"]) & data.safe_words for it in gen)
    assert any(it["mentioned_hallu"] for it in gen) and any(not it["nouns"] for it in gen)
    answers = {r["response"] for r in _responses() if r["id"] > 1004}
    assert {"Yes", "No", "yes", "No.", ""} <= answers


def test_quirks_by_hand(nltk_data) -> None:
    # AMBER_1: truth sky forest grass person lake mountain road; hallu cloud sun bird dog flower.
    one = amber_scores([{"id": 1, "response": "A man walks on the ground beside a dog. Trees and a light."}],
                       "generative", similarity="skip")
    item = one.items[0]
    # "ground" is grass's association word; "man" is person's; "Trees" keeps its capital (not a vocabulary
    # word, so dropped); "light" is a global safe word (counted, never a hallucination); "dog" is hallu.
    assert item["nouns"] == ["man", "ground", "dog", "light"]
    assert item["covered"] == ["grass", "person"] and item["mentioned_hallu"] == ["dog"]
    assert item["hallucinated"] == ["dog"]
    g = one.groups["generative"]
    # CHAIR 1/4.001, Cover 2/7.001, Hal 100 - 0/1.001, Cog 1/5.001 (the reference's 0.001 starts).
    assert (g["CHAIR"], g["Cover"], g["Hal"], g["Cog"]) == (25.0, 28.6, 100.0, 20.0)
    # With a similarity saying dog ~ forest (> 0.8), the exact hallu match falls through and is saved.
    saved = amber_scores([{"id": 1, "response": "A dog."}], "generative",
                         similarity=TableSimilarity([["dog", "forest", 0.81], ["dog", "cloud", 0.9]]))
    assert saved.items[0]["hallucinated"] == [] and saved.items[0]["covered"] == ["forest"]
    assert saved.items[0]["mentioned_hallu"] == ["cloud", "dog"]
    edge = amber_scores([{"id": 1, "response": "A dog."}], "generative",
                        similarity=TableSimilarity([["dog", "forest", 0.8]]))  # not above the threshold
    assert edge.items[0]["hallucinated"] == ["dog"]
    empty = amber_scores([{"id": 1, "response": ""}], "generative", similarity="skip").groups["generative"]
    # Hal = 100 - 1/1.001 * 100 = 0.0999 → 0.1: the 0.001 start biases it on a single empty description.
    assert (empty["CHAIR"], empty["Cover"], empty["Hal"], empty["Cog"], empty["empty"]) == (0.0, 0.0, 0.1, 0.0, 1)


def _all_discriminative(answer: str) -> list[dict]:
    return [{"id": q["id"], "response": answer} for q in amber_queries("discriminative")]


def test_degenerate_baselines_and_published_score() -> None:
    """Always "No" on the 14,216 questions: the reference formulas give Acc 66.3, P 66.3, R 100, F1 79.7
    (existence 100 on all four, attribute F1 66.7, relation 58.6); always "Yes" or lower-case "no": F1 0."""
    no = amber_scores(_all_discriminative("No"), "discriminative")
    d = no.groups["discriminative"]
    assert (d["Accuracy"], d["Precision"], d["Recall"], d["F1"]) == (66.3, 66.3, 100.0, 79.7)
    assert [no.groups["existence"][k] for k in ("Accuracy", "Precision", "Recall", "F1")] == [100.0] * 4
    assert no.groups["attribute"]["F1"] == 66.7 and no.groups["relation"]["F1"] == 58.6
    assert d["Yes_ratio"] == 0.0 and d["degenerate"] == "always No" and no.settings["degenerate"]["discriminative"]
    for answer in ("Yes", "no"):
        assert amber_scores(_all_discriminative(answer), "discriminative").metrics["F1"] == 0.0
    lower = amber_scores(_all_discriminative("no"), "discriminative")
    assert lower.settings["unparsed"] == 14216 and lower.groups["discriminative"]["degenerate"].startswith("no answer")
    # Empty descriptions plus always "No": (100 - 0 + 79.7) / 2.
    gen = [{"id": q["id"], "response": ""} for q in amber_queries("generative")]
    both = amber_scores(gen + _all_discriminative("No"), "all", nouns=lambda text: [])
    assert both.metrics["AMBER_Score"] == 89.85


def test_parsers() -> None:
    assert [parse_answer(a) for a in ("Yes", "No", "yes", "No.", " No", "")] == ["Yes", "No", None, None, None, None]
    assert [parse_answer(a, "lenient") for a in ("yes.", "No, none", "I cannot", "maybe")] == ["Yes", "No", "No", None]
    assert [parse_answer(a, "halva") for a in ("Yes!", "maybe")] == ["Yes", "No"]
    with pytest.raises(InputError, match="use one of"):
        parse_answer("Yes", "fuzzy")


def test_shipped_data_matches_the_documented_counts() -> None:
    data = load_amber_data()
    assert len(data.annotations) == 15220 and all(a["id"] == i for i, a in enumerate(data.annotations, 1))
    assert len(data.association) == 340 and len(data.vocabulary) == 418
    assert data.safe_words == {"orange", "snack", "line", "camera", "light", "shoe", "sign", "range", "individual"}
    assert set(data.start_values.values()) == {0, 0.001}
    queries = amber_queries("all")
    assert [q["id"] for q in queries] == list(range(1, 15221))
    for task in ("generative", "existence", "attribute", "relation"):
        assert {amber.task_of(data.annotation(q["id"])["type"]) for q in amber_queries(task)} == {task}
    assert queries[13192]["query"] == "Is there a chair in this image?"  # the per-task file, not query_all's


@pytest.mark.parametrize("records, message", [
    ([], "non-empty"),
    ([{"id": 1}], "lacks"),
    ([{"id": 0, "response": "x"}], "ids are integers"),
    ([{"id": "3", "response": "x"}], "ids are integers"),
    ([{"id": 1005, "response": None}], "non-string"),
    ([{"id": 1005, "response": "Yes"}, {"id": 1005, "response": "No"}], "twice"),
])
def test_bad_responses_are_refused(records, message) -> None:
    with pytest.raises(InputError, match=message):
        amber_scores(records, "discriminative")


def test_similarity_modes_are_recorded(monkeypatch) -> None:
    monkeypatch.setattr(amber, "spacy_available", lambda model=amber.SPACY_MODEL: False)
    gen = [{"id": 1, "response": "A dog."}]
    auto = amber_scores(gen, "generative", nouns=lambda t: ["dog"])
    assert auto.settings["similarity"] == "skipped (spaCy en_core_web_lg not installed)"
    with pytest.raises(InputError, match="en_core_web_lg"):
        amber_scores(gen, "generative", similarity="spacy", nouns=lambda t: ["dog"])
    # An installed spaCy is used through nlp(w).similarity(nlp(w)), each word's Doc built once.
    calls: list[str] = []

    class Doc:
        def __init__(self, text: str) -> None:
            self.text = text

        def similarity(self, other: Doc) -> float:
            return 0.9 if {self.text, other.text} == {"dog", "forest"} else 0.0

    def nlp(text: str) -> Doc:
        calls.append(text)
        return Doc(text)

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(load=lambda name: nlp, __version__="9.9"))
    monkeypatch.setattr(amber, "spacy_available", lambda model=amber.SPACY_MODEL: True)
    amber._spacy_similarity.cache_clear()
    try:
        spacy_run = amber_scores(gen, "generative", nouns=lambda t: ["dog", "dog"])
        again = amber_scores(gen, "generative", nouns=lambda t: ["dog"])  # the loaded model is reused
    finally:
        amber._spacy_similarity.cache_clear()
    assert again.items[0]["covered"] == ["forest"]
    assert spacy_run.settings["similarity"] == "spaCy 9.9 en_core_web_lg (> 0.8)"
    assert spacy_run.items[0]["covered"] == ["forest"] and spacy_run.items[0]["hallucinated"] == []
    assert len(calls) == len(set(calls))


def test_fixture_inputs_are_what_the_tool_writes(tmp_path) -> None:
    import importlib.util

    tool = Path(__file__).resolve().parents[1] / "tools" / "parity" / "amber" / "make_inputs.py"
    spec = importlib.util.spec_from_file_location("amber_make_inputs", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in ("responses.json", "responses_lenient.json", "similarity_table.json"):
        assert (tmp_path / name).read_bytes() == (PARITY / name).read_bytes(), name


def test_bootstrap_intervals(nltk_data) -> None:
    from vlmscope.eval.amber import amber_intervals

    result = amber_scores(_responses(), "all", similarity="skip")
    intervals = amber_intervals(result, draws=200, seed=3)
    assert set(intervals) == {"CHAIR", "Cover", "Hal", "Cog", "Accuracy", "Precision", "Recall", "F1", "AMBER_Score"}
    for name, iv in intervals.items():
        # Plain pooled ratios: within rounding (0.05) and the 0.001 starts of the reported figure.
        assert abs(iv.value - result.metrics[name]) <= 0.1, name
        assert iv.low <= iv.value <= iv.high and iv.high > iv.low, name
    assert amber_intervals(result, draws=200, seed=3) == intervals
    # Always "No": every resample has recall 100 (all no-questions answered No).
    always_no = amber_intervals(amber_scores(_all_discriminative("No"), "discriminative"), draws=50)
    assert (always_no["Recall"].low, always_no["Recall"].high) == (100.0, 100.0)
    assert always_no["F1"].low < 79.7 < always_no["F1"].high
