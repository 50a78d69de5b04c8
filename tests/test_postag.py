"""The builtin normaliser's part-of-speech model: hand-computed scores, and a fit that reproduces its labels."""

from __future__ import annotations

from vlmscope.eval.postag import PosModel, coarse, features, is_sensitive, train


def test_model_scores_penn_tags_and_answers_the_wordnet_part_of_speech() -> None:
    assert is_sensitive("seated") and not is_sensitive("man")
    # Hand-computed: for "seated", VBN scores 1.0 - 0.25 = 0.75, JJ 0.5, NN 0.1 → VBN → verb.
    weights = {"w=seated": {"VBN": 1.0, "JJ": 0.5}, "p1=a": {"VBN": -0.25}, "bias": {"NN": 0.1}}
    model = PosModel(weights, lexicon={})
    assert model.classes == ("JJ", "NN", "VBN")
    assert model.predict(features(["a", "seated", "man"], 1, {})) == "VBN"
    assert model.tag(["a", "seated", "man"]) == ["n", "v", "n"]  # insensitive words are nouns untouched
    # Ties go to the alphabetically first tag: JJ over VBN → adjective.
    tied = PosModel({"w=seated": {"VBN": 1.0, "JJ": 1.0}}, lexicon={})
    assert tied.tag(["seated"]) == ["a"]
    assert [coarse(t) for t in ("NNS", "VBG", "JJR", "RB", "DT")] == ["n", "v", "a", "r", "n"]


def test_fit_learns_context_dependent_tags() -> None:
    # The same word, tagged differently by its context: the fit must reproduce both calls.
    sentences = [
        ("a man seated on a bench".split(), ["DT", "NN", "VBN", "IN", "DT", "NN"]),
        ("a woman seated at a table".split(), ["DT", "NN", "VBN", "IN", "DT", "NN"]),
        ("the seated crowd watches".split(), ["DT", "JJ", "NN", "VBZ"]),
        ("some seated people wait".split(), ["DT", "JJ", "NNS", "VBP"]),
        ("two potted plants stand".split(), ["CD", "JJ", "NNS", "VBP"]),
    ] * 3
    weights, lexicon = train(sentences, iterations=6, seed=0)
    model = PosModel(weights, lexicon)
    assert {"VBN", "JJ"} <= set(model.classes)
    assert model.tag("a man seated on a bench".split())[2] == "v"
    assert model.tag("the seated crowd watches".split())[1] == "a"
    assert model.tag("two potted plants stand".split())[1] == "a"
    assert train(sentences, iterations=6, seed=0) == (weights, lexicon)  # deterministic for a seed
