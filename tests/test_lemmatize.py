"""The download-free lemmatiser against WordNet 3.0 answers (NLTK's WordNetLemmatizer, values as WordNet gives them)."""

from __future__ import annotations

import pytest

from vlmscope.eval.chair import vocabulary_words
from vlmscope.eval.lemmatize import in_lexicon, lemma_candidates, lemmatize
from vlmscope.eval.tokenize import sent_tokenize, treebank_tokenize, word_tokenize

# WordNetLemmatizer().lemmatize(word) (noun) with WordNet 3.0. Several are surprising but are what the
# reference computes: "vases" → "vas", "men" → "men" (both "men" and "man" are nouns, equally short, the
# word itself comes first), "teeth" → "teeth", "cookies" → "cooky", "species" → "specie".
NOUN_CASES = {
    "glasses": "glass",
    "people": "people",
    "mice": "mouse",
    "women": "woman",
    "men": "men",
    "buses": "bus",
    "skis": "ski",
    "dishes": "dish",
    "knives": "knife",
    "scissors": "scissors",
    "pants": "pant",
    "ties": "tie",
    "benches": "bench",
    "leaves": "leaf",
    "children": "child",
    "teeth": "teeth",
    "geese": "goose",
    "sheep": "sheep",
    "species": "specie",
    "cookies": "cooky",
    "ponies": "pony",
    "boxes": "box",
    "foxes": "fox",
    "shorts": "short",
    "vases": "vas",
    "sports": "sport",
    "calves": "calf",
    "oxen": "ox",
    "wolves": "wolf",
    "sandwiches": "sandwich",
    "toothbrushes": "toothbrush",
    "donuts": "donut",
    "frisbees": "frisbee",
    "tvs": "tv",
    "cellphones": "cellphone",
    "skateboarders": "skateboarder",
    # singular words ending in -s are not stripped
    "bus": "bus",
    "glass": "glass",
    "grass": "grass",
    "dress": "dress",
    "series": "series",
    "canvas": "canvas",
    # unknown to WordNet: unchanged, so their plurals never match
    "lenovos": "lenovos",
    "macbooks": "macbooks",
    "smartphones": "smartphones",
    "teddybears": "teddybears",
}

VERB_CASES = {
    "skiing": "ski",
    "seated": "seat",
    "tied": "tie",
    "tying": "tie",
    "born": "bear",
    "lit": "light",
    "training": "train",
    "parking": "park",
    "potted": "pot",
    "skateboarding": "skateboard",
    "dining": "din",
    "scissors": "scissor",
    "glasses": "glass",
}


@pytest.mark.parametrize(("word", "lemma"), sorted(NOUN_CASES.items()))
def test_noun_lemmas_match_wordnet(word: str, lemma: str) -> None:
    assert lemmatize(word) == lemma


@pytest.mark.parametrize(("word", "lemma"), sorted(VERB_CASES.items()))
def test_verb_lemmas_match_wordnet(word: str, lemma: str) -> None:
    assert lemmatize(word, "v") == lemma


def test_adjective_and_adverb_lemmas() -> None:
    assert lemmatize("hotter", "a") == "hot"
    assert lemmatize("better", "a") == "good"
    assert lemmatize("potted", "a") == "potted"
    assert lemmatize("skis", "r") == "skis"


def test_candidates_keep_morphy_order() -> None:
    # Equally short candidates: the first one found wins (word itself, then rule order).
    assert lemma_candidates("men") == ["men", "man"]
    assert lemma_candidates("glasses") == ["glasses", "glass"]
    assert lemma_candidates("doggies") == ["doggie", "doggy"]
    assert lemmatize("doggies") == "doggy"


def test_repeated_rule_step_is_optional() -> None:
    # NLTK <= 3.8 keeps applying the rules when nothing matched at the first level; 3.9 stopped.
    assert lemmatize("carss") == "car"
    assert lemmatize("carss", iterate=False) == "carss"


def test_every_chair_word_has_its_wordnet_status() -> None:
    vocab = vocabulary_words()
    # Words of the synonym list that WordNet lacks (their plurals are never reduced) ...
    for word in ("lenovo", "macbook", "teddybear", "hairdryer", "solider", "televison", "knive"):
        assert word in vocab and not in_lexicon(word)
    # ... and some it has.
    for word in ("dog", "skateboard", "frisbee", "cellphone", "tv", "ski", "donut", "phon"):
        assert in_lexicon(word)


def test_unknown_part_of_speech_is_rejected() -> None:
    with pytest.raises(ValueError, match="part of speech"):
        lemmatize("dogs", "x")


# Treebank tokeniser: outputs of nltk.tokenize.NLTKWordTokenizer on these single sentences.
TOKEN_CASES = [
    ("the dog's bone isn't here.", ["the", "dog", "'s", "bone", "is", "n't", "here", "."]),
    ('she said "hello, 3,000 dogs!"', ["she", "said", "``", "hello", ",", "3,000", "dogs", "!", "''"]),
    ("a man (with a hat) -- and a dog; cats: two...", [
        "a", "man", "(", "with", "a", "hat", ")", "--", "and", "a", "dog", ";", "cats", ":", "two", "...",
    ]),
    ("i cannot see a hot-dog", ["i", "can", "not", "see", "a", "hot-dog"]),
    ('it reads "stop."', ["it", "reads", "``", "stop", ".", "''"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "tokens"), TOKEN_CASES)
def test_treebank_tokenize_matches_nltk(text: str, tokens: list[str]) -> None:
    assert treebank_tokenize(text) == tokens


# Sentence splitting follows an untrained PunktSentenceTokenizer() on lower-cased text (the reference's
# stand-in): a period after an ordinary word ends the sentence (so it becomes its own token), also after
# "mr." or "u.s."; after a number or an initial followed by a lower-case word it does not.
SPLIT_CASES = [
    ("a dog in the sun. the end", ["a dog in the sun.", "the end"]),
    ('it reads "stop." the car waits. ok', ['it reads "stop."', "the car waits.", "ok"]),
    ("on u.s. highway 395. the sign", ["on u.s.", "highway 395. the sign"]),
    ("mr. smith sat. then left!  fine? yes", ["mr.", "smith sat.", "then left!", "fine?", "yes"]),
    ("wait... the dog", ["wait... the dog"]),
    ("a. b c at 5 p.m. the dog", ["a. b c at 5 p.m.", "the dog"]),
    # a number before a closing quote ends the sentence; "10:21." is judged by "21."
    ('is 395." the road at 10:21. been there', ['is 395."', "the road at 10:21. been there"]),
    # a closing quote that would open the next sentence stays with the previous one
    ('reads " special. " the bus', ['reads " special. "', "the bus"]),
    ("a process.; furthermore, x", ["a process.", "; furthermore, x"]),
]


@pytest.mark.parametrize(("text", "sentences"), SPLIT_CASES)
def test_sentence_split(text: str, sentences: list[str]) -> None:
    from nltk.tokenize import PunktSentenceTokenizer

    assert PunktSentenceTokenizer().tokenize(text) == sentences  # the oracle agrees with the table
    assert sent_tokenize(text) == sentences


def test_word_tokenize_splits_only_sentence_final_periods() -> None:
    assert word_tokenize("a dog in the sun. the end.") == ["a", "dog", "in", "the", "sun", ".", "the", "end", "."]
    assert word_tokenize("on u.s. highway 395. the sign") == ["on", "u.s", ".", "highway", "395.", "the", "sign"]
    # Unicode apostrophes are split off as NLTK does.
    assert word_tokenize("one person’s dog") == ["one", "person", "’", "s", "dog"]
