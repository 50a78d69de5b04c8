"""Regenerate ``src/vlmscope/eval/_wordnet_subset.py`` from a WordNet 3.0 dictionary folder.

Usage (the bundled subset was made with exactly this, WordNet from Debian's wordnet-base 3.0):

    PYTHONPATH=src python tools/gen_wordnet_subset.py --wordnet-dir /usr/share/wordnet \
        --captions ../shared/data/chair/llava15_{greedy,beam5,opera}_captions.jsonl

The folder is the WordNet 3.0 ``dict`` directory (index.noun, noun.exc, ...), e.g. from Debian's
``wordnet-base`` package. The subset keeps, for each part of speech, every lemma and exception entry that
takes part in lemmatising a word whose morphy candidates (at any depth of rule application) include a CHAIR
vocabulary word. Words tried: all WordNet lemmas, all exception forms, regular inflections of the vocabulary
and the words of EXTRA_WORDS and of the given caption files, whose lemmas are also kept exact (so common
caption words lemmatise as in NLTK, not only the CHAIR vocabulary). The script then checks the subset
against a full-WordNet morphy on the same words and fails if any result differs where it matters.
Needs no NLTK; run from the repository root with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from vlmscope.eval.chair import load_captions, vocabulary_words
from vlmscope.eval.lemmatize import _RULES
from vlmscope.eval.tokenize import word_tokenize

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
OUT = Path(__file__).resolve().parents[1] / "src" / "vlmscope" / "eval" / "_wordnet_subset.py"
# Irregular and tricky plurals that captions produce, kept exact besides the CHAIR vocabulary.
EXTRA_WORDS = """
people mice knives glasses buses skis benches dishes leaves women children teeth geese sheep species scissors
pants shorts cookies ponies boxes foxes ties men feet wolves shelves loaves halves wives lives calves
""".split()


def read_wordnet(folder: Path) -> tuple[dict[str, set[str]], dict[str, dict[str, list[str]]]]:
    lemmas: dict[str, set[str]] = {}
    exceptions: dict[str, dict[str, list[str]]] = {}
    for pos, name in POS_FILES.items():
        words = set()
        with open(folder / f"index.{name}", encoding="utf-8") as fh:
            for line in fh:
                if not line.startswith(" "):  # licence header lines start with spaces
                    words.add(line.split(" ", 1)[0])
        lemmas[pos] = words
        exc: dict[str, list[str]] = {}
        with open(folder / f"{name}.exc", encoding="utf-8") as fh:
            for line in fh:
                terms = line.split()
                if terms:
                    exc[terms[0]] = terms[1:]
        exceptions[pos] = exc
    return lemmas, exceptions


def detach(forms: list[str], pos: str) -> list[str]:
    return [f[: len(f) - len(old)] + new for f in forms for old, new in _RULES[pos] if f.endswith(old)]


def closure(word: str, pos: str, exceptions: dict[str, dict[str, list[str]]]) -> set[str]:
    """Every form morphy may look at: the exception targets and, as the subset may lack the exception
    entry, also every form reachable by the rules."""
    seen = {word, *exceptions[pos].get(word, ())}
    forms = [word]
    while forms:
        forms = [f for f in detach(forms, pos) if f not in seen]
        seen.update(forms)
    return seen


def morphy(word: str, pos: str, lexicon: set[str], exceptions: dict[str, list[str]]) -> str:
    """WordNetLemmatizer.lemmatize as in NLTK <= 3.8 (with the repeated-rules step)."""

    def known(forms: list[str]) -> list[str]:
        out: list[str] = []
        for f in forms:
            if f in lexicon and f not in out:
                out.append(f)
        return out

    if word in exceptions:
        found = known([word, *exceptions[word]])
    else:
        forms = detach([word], pos)
        found = known([word, *forms])
        while not found and forms:
            forms = detach(forms, pos)
            found = known(forms)
    return min(found, key=len) if found else word


def inflections(word: str) -> set[str]:
    out = {word + s for s in ("s", "es", "ed", "d", "ing", "er", "est", "r", "st", "ss", "ses")}
    if word.endswith("y"):
        out |= {word[:-1] + s for s in ("ies", "ied", "ier", "iest")}
    if word.endswith("e"):
        out |= {word[:-1] + "ing"}
    if word.endswith(("f", "fe")):
        out |= {word.rsplit("f", 1)[0] + "ves"}
    if word.endswith("man"):
        out |= {word[:-3] + "men"}
    if word.endswith("ie"):
        out |= {word[:-2] + "ying"}
    if word and word[-1] not in "aeiouwxy":
        out |= {word + word[-1] + s for s in ("ed", "ing", "er", "est")}
    return out | {w + "s" for w in out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, required=True)
    parser.add_argument("--captions", type=Path, nargs="*", default=[], help="caption JSON-lines files")
    args = parser.parse_args()
    lemmas, exceptions = read_wordnet(args.wordnet_dir)
    vocab = set(vocabulary_words())
    exact = set(EXTRA_WORDS)
    for path in args.captions:
        for record in load_captions(path):
            exact.update(word_tokenize(record["caption"].lower()))
    universe = set().union(*lemmas.values()) | exact
    for pos in POS_FILES:
        universe |= set(exceptions[pos])
    for word in vocab:
        universe |= {word} | inflections(word)
    for word in exact:
        vocab |= {morphy(word, pos, lemmas[pos], exceptions[pos]) for pos in POS_FILES}

    keep: dict[str, set[str]] = {pos: set() for pos in POS_FILES}
    keep_exc: dict[str, dict[str, list[str]]] = {pos: {} for pos in POS_FILES}
    for pos in POS_FILES:
        for word in universe:
            forms = closure(word, pos, exceptions)
            if forms & vocab:
                keep[pos] |= forms & lemmas[pos]
                if word in exceptions[pos]:
                    keep_exc[pos][word] = exceptions[pos][word]
        keep[pos] |= vocab & lemmas[pos]

    # Check: wherever either answer is a vocabulary word, the subset must agree with full WordNet.
    bad = []
    for pos in POS_FILES:
        for word in universe:
            full = morphy(word, pos, lemmas[pos], exceptions[pos])
            sub = morphy(word, pos, keep[pos], keep_exc[pos])
            if full != sub and (full in vocab or sub in vocab):
                bad.append((pos, word, full, sub))
    if bad:
        for item in bad[:50]:
            print("mismatch", item, file=sys.stderr)
        return 1

    lines = [
        '"""WordNet 3.0 subset for `vlmscope.eval.lemmatize` (generated by tools/gen_wordnet_subset.py; do not edit).',
        "",
        "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Distributed under the WordNet",
        "3.0 licence; see vlmscope/data/LICENSES.md.",
        '"""',
        "",
        "# fmt: off",
        "LEMMAS: dict[str, frozenset[str]] = {",
    ]
    for pos in POS_FILES:
        body = textwrap.fill(" ".join(sorted(keep[pos])), 100, initial_indent="    ", subsequent_indent="    ")
        lines += [f'    "{pos}": frozenset("""', body, '    """.split()),']
    lines += ["}", "", "EXCEPTIONS: dict[str, dict[str, tuple[str, ...]]] = {"]
    for pos in POS_FILES:
        lines.append(f'    "{pos}": {{')
        for word in sorted(keep_exc[pos]):
            targets = ", ".join(f'"{t}"' for t in keep_exc[pos][word])
            lines.append(f'        "{word}": ({targets},),')
        lines.append("    },")
    lines += ["}", "# fmt: on", ""]
    OUT.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {OUT}: " + ", ".join(f"{p}: {len(keep[p])} lemmas, {len(keep_exc[p])} exceptions" for p in POS_FILES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
