"""Dependency-free word tokenisation that behaves like ``nltk.word_tokenize`` on caption text.

``nltk.word_tokenize`` first splits sentences with the Punkt model and then runs the (improved) Treebank
word tokenizer on each sentence. The Treebank rules only split a period off the *last* word of the string, so
the sentence splitter decides which periods become separate tokens; CHAIR's ``Len`` counts these tokens and a
period left attached ("table.") hides an object word.

What is reproduced:
- Treebank rules for ASCII text: quotes become ``` `` ``` / ``''``; ``, ; : @ # $ % & ? ! * ( ) [ ] { } < >``
  and ``--`` are split off (a comma or colon followed by a digit stays, "1,000"); ``...`` is one token;
  clitics ``'s 'm 'd 'll 're 've n't`` and a bare trailing ``'`` are split; "cannot" → "can not" and the other
  MacIntyre contractions; hyphenated words stay one token.
- Punkt decisions for *lower-cased* text (which is what CHAIR feeds it), as an untrained
  ``PunktSentenceTokenizer()`` (the reference's stand-in for the English model) makes them: a period followed
  by whitespace ends a sentence unless the word before it is a number, a single letter, or an ellipsis.
- The Unicode quotes NLTK splits off (« “ ‘ „ » ” ’), so "person’s" gives "person", "’", "s".

Not reproduced: the English Punkt model's learned abbreviations and collocations (pass abbreviations to
`sent_tokenize` to approximate them). On the 12 released OPERA caption logs (6,000 captions) the token
sequences are identical to the exact normaliser's.
"""

from __future__ import annotations

import re

__all__ = ["sent_tokenize", "treebank_tokenize", "word_tokenize"]

# Abbreviations whose period does not end a sentence. Empty: the reference figures were produced with an
# untrained ``PunktSentenceTokenizer()`` standing in for the English model (see `vlmscope.eval.nltk_backend`),
# which knows no abbreviations ("mr. smith" is split after "mr."); pass your own set to `sent_tokenize` to
# mimic the English model.
ABBREVIATIONS: frozenset[str] = frozenset()

_CLOSERS = "\"')]}"
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.\-]*\.?$")
_INITIAL = re.compile(r"^[^\W\d]\.$")


def _ends_sentence(chunk: str, abbreviations: frozenset[str] = ABBREVIATIONS) -> bool:
    """Whether a whitespace-delimited chunk ends a sentence (Punkt's decision on lower-cased text)."""
    core = chunk.rstrip(_CLOSERS)
    if not core or core[-1] not in ".?!":
        return False
    if core[-1] in "?!":
        return True
    if core.endswith(".."):
        # An ellipsis followed by a lower-case word continues the sentence.
        return False
    # Punkt's word tokens break at these characters: "10:21." is judged by "21.".
    word = re.split(r"[:;&#*@(){}\[\]\"]", core)[-1]
    if len(word) <= 1:
        return True
    if word[:-1] in abbreviations or word[:-1].split("-")[-1] in abbreviations:
        return False
    if chunk != core:
        # A closing quote or bracket right after the period ("395.\"") makes it a sentence end regardless.
        return True
    # Numbers ("395.") and initials ("a.") are only sentence ends before an upper-case word.
    return not (_NUMBER.match(word) or _INITIAL.match(word))


# A period directly followed by one of these also ends a sentence, which then starts with them ("process.;").
_INNER_BREAK = re.compile(r"(?<=[^.\s])\.(?=[;:*@({\[])")
# Closing quotes/brackets (then whitespace) that open a sentence go back to the previous one, as Punkt's
# boundary realignment does ('reads " special. " the' is one sentence up to the second quote).
_LEADING_CLOSERS = re.compile(r"^[\"')\]}]+(?:\s+|$)")


def sent_tokenize(text: str, abbreviations: frozenset[str] = ABBREVIATIONS) -> list[str]:
    """Split lower-cased text into sentences the way (untrained, by default) Punkt does for it."""
    cuts: list[int] = []
    end = len(text.rstrip())
    for match in re.finditer(r"\S+", text):
        chunk = match.group()
        for inner in _INNER_BREAK.finditer(chunk):
            cuts.append(match.start() + inner.end())
        if _ends_sentence(chunk, abbreviations) and match.end() < end:
            cuts.append(match.end())
    sentences: list[str] = []
    start = 0
    for cut in [*cuts, len(text)]:
        piece = text[start:cut]
        lead = _LEADING_CLOSERS.match(piece.lstrip())
        if lead and sentences:
            sentences[-1] += " " + lead.group().strip()
            piece = piece.lstrip()[lead.end() :]
        if piece.strip():
            sentences.append(piece.strip())
        start = cut
    return sentences


# Treebank passes, in order. Each is (pattern, replacement); the order matters (e.g. the quote rules
# run before the clitic rules).
_START_QUOTES = [
    (re.compile(r"([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r'^"'), "``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ (\[{<])(\"|'')"), r"\1 `` "),
    # A leading apostrophe before a word that is not a clitic: "'hello" -> "'", "hello".
    (re.compile(r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_PUNCT = [
    (re.compile(r"([^.])(\.)([\]\)}>\"']*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
    (re.compile(r"[\]\[(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), r" -- "),
]
_END_QUOTES = [
    (re.compile(r"([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_CONTRACTIONS = [
    re.compile(p)
    for p in (
        r"(?i)\b(can)(not)\b",
        r"(?i)\b(d)('ye)\b",
        r"(?i)\b(gim)(me)\b",
        r"(?i)\b(gon)(na)\b",
        r"(?i)\b(got)(ta)\b",
        r"(?i)\b(lem)(me)\b",
        r"(?i)\b(more)('n)\b",
        r"(?i)\b(wan)(na)(?=\s)",
        r"(?i) ('t)(is)\b",
        r"(?i) ('t)(was)\b",
    )
]


def treebank_tokenize(sentence: str) -> list[str]:
    """Tokenise one sentence with the Treebank rules (see the module docstring)."""
    text = sentence
    for pattern, repl in _START_QUOTES:
        text = pattern.sub(repl, text)
    for pattern, repl in _PUNCT:
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _END_QUOTES:
        text = pattern.sub(repl, text)
    for pattern in _CONTRACTIONS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """Sentence-split, then Treebank-tokenise each sentence (``nltk.word_tokenize`` equivalent)."""
    return [tok for sent in sent_tokenize(text) for tok in treebank_tokenize(sent)]
