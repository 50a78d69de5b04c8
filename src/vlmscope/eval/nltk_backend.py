"""The exact CHAIR normaliser: NLTK's tokenizer, perceptron tagger and WordNet, as the reference uses them.

The reference ``chair.py`` (OPERA / Maxlinn) ran with nltk 3.8.1: ``word_tokenize`` → ``pos_tag`` →
``WordNetLemmatizer().lemmatize(word, wordnet_pos(tag))``. This module reproduces that on any nltk ≥ 3.8:

- **Tokens**: NLTK's ``word_tokenize`` pipeline (Punkt sentences, then NLTK's improved Treebank tokenizer).
  The English Punkt model (``punkt_tab`` in nltk ≥ 3.9, ``punkt`` before) is used when installed; without it
  an untrained ``PunktSentenceTokenizer()`` splits the sentences, which is how the figures in the README were
  produced (they equal the OPERA paper's wherever it has the row). Which one ran is recorded.
- **Tags**: NLTK's ``PerceptronTagger`` with the English averaged-perceptron weights, read from either layout:
  ``taggers/averaged_perceptron_tagger_eng/*.json`` (nltk ≥ 3.9) or the older
  ``taggers/averaged_perceptron_tagger/averaged_perceptron_tagger.pickle``. NLTK ≥ 3.9 refuses the pickle;
  here it is read with an unpickler that admits nothing but built-in containers, so no code can run, and
  `install_data` converts it to the JSON layout for NLTK itself.
- **Lemmas**: WordNet through NLTK's corpus reader, with the morphy of nltk 3.8.1 (which, when no form found
  by one rule is a lemma, keeps applying the rules; nltk ≥ 3.9 stopped doing that). The two differ only on
  non-words such as "carss", but the reference is 3.8.1, so its behaviour is the one reproduced.

`vlmscope chair setup` (`install_data`) installs the three data packages: downloaded by NLTK when online, or
copied from a folder (an ``nltk_data`` checkout, an NLTK_DATA folder, or loose ``.zip``/``.tgz`` packages).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vlmscope.errors import InputError

__all__ = [
    "NltkStatus",
    "SETUP_HINT",
    "install_data",
    "nltk_normaliser",
    "nltk_status",
]

SETUP_HINT = "run `vlmscope chair setup` (or `vlmscope chair setup --from DIR` offline) for exact figures"
TAGGER_JSON_DIR = "taggers/averaged_perceptron_tagger_eng"
TAGGER_JSON_FILES = tuple(f"averaged_perceptron_tagger_eng.{part}.json" for part in ("weights", "tagdict", "classes"))
TAGGER_PICKLE = "taggers/averaged_perceptron_tagger/averaged_perceptron_tagger.pickle"
WORDNET_DIR = "corpora/wordnet"
PUNKT_RESOURCES = ("tokenizers/punkt_tab/english/", "tokenizers/punkt/english.pickle")


@dataclass(frozen=True)
class NltkStatus:
    """What the exact normaliser would use; `missing` lists what prevents it (empty: usable)."""

    nltk_version: str | None
    tagger: str | None  # "json" or "pickle"
    wordnet: bool
    sentence_splitter: str  # "punkt_tab", "punkt" or "untrained-punkt"
    missing: tuple[str, ...]

    @property
    def available(self) -> bool:
        return not self.missing

    def describe(self) -> str:
        return (
            f"nltk {self.nltk_version}, perceptron tagger ({self.tagger}), WordNet, "
            f"sentences: {self.sentence_splitter}"
        )


def _find(resource: str) -> str | None:
    import nltk

    try:
        return str(nltk.data.find(resource))
    except LookupError:
        return None


def nltk_status() -> NltkStatus:
    """Whether NLTK and the data the exact normaliser needs are installed (looked up on NLTK's data path)."""
    try:
        import nltk
    except ImportError:
        return NltkStatus(None, None, False, "untrained-punkt", ("the nltk package (pip install nltk)",))
    missing = []
    tagger = None
    if all(_find(f"{TAGGER_JSON_DIR}/{name}") for name in TAGGER_JSON_FILES):
        tagger = "json"
    elif _find(TAGGER_PICKLE):
        tagger = "pickle"
    else:
        missing.append("averaged_perceptron_tagger_eng")
    wordnet = _find(f"{WORDNET_DIR}/index.noun") is not None
    if not wordnet:
        missing.append("wordnet")
    splitter = "untrained-punkt"
    for resource in PUNKT_RESOURCES:
        if _find(resource):
            splitter = "punkt_tab" if "punkt_tab" in resource else "punkt"
            break
    return NltkStatus(nltk.__version__, tagger, wordnet, splitter, tuple(missing))


class _ContainersOnly(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings, numbers and sets; refuses every other global (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in ("set", "frozenset"):
            return {"set": set, "frozenset": frozenset}[name]
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a tagger pickle")


def read_tagger_pickle(data: bytes) -> tuple[dict, dict, list]:
    """``(weights, tagdict, classes)`` of NLTK's old ``averaged_perceptron_tagger.pickle``."""
    weights, tagdict, classes = _ContainersOnly(io.BytesIO(data), encoding="latin-1").load()
    if not isinstance(weights, dict) or not isinstance(tagdict, dict):
        raise InputError("the tagger pickle does not hold (weights, tagdict, classes); use NLTK's averaged_perceptron_tagger")
    return weights, tagdict, sorted(classes)


def _tagger_params() -> tuple[dict, dict, list]:
    import nltk

    if all(_find(f"{TAGGER_JSON_DIR}/{name}") for name in TAGGER_JSON_FILES):
        params = []
        for name in TAGGER_JSON_FILES:
            with nltk.data.find(f"{TAGGER_JSON_DIR}/{name}").open() as fh:
                params.append(json.loads(fh.read()))
        return params[0], params[1], params[2]
    with nltk.data.find(TAGGER_PICKLE).open() as fh:
        return read_tagger_pickle(fh.read())


class _Morphy381:
    """WordNet lemmatisation exactly as nltk 3.8.1's ``WordNetLemmatizer.lemmatize``.

    The lemma and exception lists are read straight from NLTK's ``corpora/wordnet`` (folder or zip), as NLTK's
    reader loads them: nltk ≥ 3.9's reader also wants ``index.sense`` to map versions whenever the data files'
    header lacks the "WordNet 3.0 Copyright" line (Debian's wordnet-base), which the lemmatiser never uses.
    """

    def __init__(self) -> None:
        import nltk

        from vlmscope.eval.lemmatize import _RULES

        root = nltk.data.find(WORDNET_DIR)
        self._lemmas: dict[str, set[str]] = {}
        self._exceptions: dict[str, dict[str, list[str]]] = {}
        for pos, name in (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv")):
            with root.join(f"index.{name}").open() as fh:
                for raw in fh:
                    line = raw.decode("utf-8")
                    if not line.startswith(" "):  # the licence header lines start with spaces
                        self._lemmas.setdefault(line.split(" ", 1)[0], set()).add(pos)
            exceptions: dict[str, list[str]] = {}
            with root.join(f"{name}.exc").open() as fh:
                for raw in fh:
                    terms = raw.decode("utf-8").split()
                    if terms:
                        exceptions[terms[0]] = terms[1:]
            self._exceptions[pos] = exceptions
        # WordNet's detachment rules (the same table as NLTK's MORPHOLOGICAL_SUBSTITUTIONS).
        self._rules = _RULES

    def _known(self, forms: list[str], pos: str) -> list[str]:
        out: list[str] = []
        for form in forms:
            if pos in self._lemmas.get(form, ()) and form not in out:
                out.append(form)
        return out

    def lemmatize(self, word: str, pos: str) -> str:
        rules = self._rules[pos]

        def detach(forms: list[str]) -> list[str]:
            return [f[: -len(old)] + new for f in forms for old, new in rules if f.endswith(old)]

        if word in self._exceptions[pos]:
            found = self._known([word, *self._exceptions[pos][word]], pos)
        else:
            forms = detach([word])
            found = self._known([word, *forms], pos)
            while not found and forms:
                forms = detach(forms)
                found = self._known(forms, pos)
        return min(found, key=len) if found else word


# The reference's map from Penn tags to WordNet parts of speech (anything else: noun).
_WORDNET_POS = {"J": "a", "V": "v", "N": "n", "R": "r"}


def wordnet_pos(penn_tag: str) -> str:
    """The WordNet part of speech the reference lemmatises a token of this Penn tag with."""
    return _WORDNET_POS.get(penn_tag[:1], "n")


def nltk_normaliser() -> Callable[[str], tuple[list[str], list[str]]]:
    """The reference normaliser (caption → tokens, lemmas); `InputError` naming the fix if data are missing."""
    status = nltk_status()  # looked up every time (cheap): data installed or removed meanwhile count
    if not status.available:
        raise InputError(f"normaliser 'nltk' needs {', '.join(status.missing)}; {SETUP_HINT}, or use --normaliser builtin")
    return _build_normaliser(status)


@lru_cache(maxsize=2)
def _build_normaliser(status: NltkStatus) -> Callable[[str], tuple[list[str], list[str]]]:
    import nltk
    from nltk.tag.perceptron import PerceptronTagger
    from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer

    if status.sentence_splitter == "untrained-punkt":
        split_sentences = PunktSentenceTokenizer().tokenize
    else:
        split_sentences = nltk.tokenize.sent_tokenize
    word_tokenizer = NLTKWordTokenizer()
    tagger = PerceptronTagger(load=False)
    weights, tagdict, classes = _tagger_params()
    tagger.model.weights = weights
    tagger.tagdict = tagdict
    tagger.classes = tagger.model.classes = set(classes)
    morphy = _Morphy381()

    def tokenize(caption: str) -> list[str]:
        return [tok for sent in split_sentences(caption.lower()) for tok in word_tokenizer.tokenize(sent)]

    def tagged(caption: str) -> tuple[list[str], list[str]]:
        """Tokens and their Penn Treebank tags, as the reference computes them."""
        tokens = tokenize(caption)
        return tokens, [t for _, t in tagger.tag(tokens)]

    def normalise(caption: str) -> tuple[list[str], list[str]]:
        tokens, tags = tagged(caption)
        return tokens, [morphy.lemmatize(w, wordnet_pos(t)) for w, t in zip(tokens, tags)]

    def nouns_cased(text: str) -> list[str]:
        """AMBER's noun path: word_tokenize without lower-casing, pos_tag, NN* tokens lemmatised as nouns."""
        tokens = [tok for sent in split_sentences(text) for tok in word_tokenizer.tokenize(sent)]
        return [morphy.lemmatize(w, "n") for w, t in tagger.tag(tokens) if t.startswith("NN")]

    normalise.name = "nltk"  # type: ignore[attr-defined]
    normalise.nouns_cased = nouns_cased  # type: ignore[attr-defined]
    normalise.tagged = tagged  # type: ignore[attr-defined]
    normalise.tokenize = tokenize  # type: ignore[attr-defined]
    normalise.tag_tokens = lambda tokens: [t for _, t in tagger.tag(list(tokens))]  # type: ignore[attr-defined]
    normalise.detail = status.describe()  # type: ignore[attr-defined]
    return normalise


# ---------------------------------------------------------------------------------------------------------
# Installing the data


def default_data_dir() -> Path:
    """Where `install_data` writes by default: the first folder of ``$NLTK_DATA``, else ``~/nltk_data``."""
    env = os.environ.get("NLTK_DATA", "").split(os.pathsep)[0]
    return Path(env) if env else Path.home() / "nltk_data"


def _safe_extract(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise InputError(f"{archive} has an unsafe member {member!r}; use an official NLTK package")
            zf.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")
    else:
        raise InputError(f"{archive} is neither a zip nor a tar archive; pass NLTK's data packages")


def _candidates(source: Path, stem: str) -> list[Path]:
    """Folders named `stem` and archives named ``stem*.zip|tgz|tar.gz`` anywhere under `source`."""
    found = [p for p in source.rglob(stem) if p.is_dir()]
    for pattern in (f"{stem}.zip", f"{stem}-*.zip", f"{stem}.tgz", f"{stem}-*.tgz", f"{stem}.tar.gz", f"{stem}-*.tar.gz"):
        found += sorted(source.rglob(pattern))
    return found


def _materialise(candidate: Path, work: Path, marker: str) -> Path | None:
    """A folder holding `marker` from a candidate folder or archive (extracted under `work`)."""
    if candidate.is_dir():
        root = candidate
    else:
        root = work / candidate.name
        root.mkdir()
        _safe_extract(candidate, root)
    hits = sorted(root.rglob(marker))
    return hits[0].parent if hits else None


def _copy_tree(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dest)


def _write_tagger_json(weights: dict, tagdict: dict, classes: list, dest_dir: Path) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name, part in zip(TAGGER_JSON_FILES, (weights, tagdict, classes)):
        tmp = dest_dir / (name + ".tmp")
        tmp.write_text(json.dumps(part), encoding="utf-8")
        os.replace(tmp, dest_dir / name)


def install_from(source: Path, dest: Path) -> list[str]:
    """Copy the tagger, WordNet and (if present) Punkt from a folder into the NLTK data folder `dest`."""
    if not source.is_dir():
        raise InputError(f"NLTK data folder not found: {source}; pass a folder holding the NLTK packages")
    done: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Tagger: the JSON layout wins; the old pickle is copied (for nltk <= 3.8) and converted to JSON.
        tagger_json = tagger_pickle = None
        for cand in _candidates(source, "averaged_perceptron_tagger_eng"):
            tagger_json = _materialise(cand, work, TAGGER_JSON_FILES[0])
            if tagger_json:
                break
        for cand in _candidates(source, "averaged_perceptron_tagger"):
            tagger_pickle = _materialise(cand, work, "averaged_perceptron_tagger.pickle")
            if tagger_pickle:
                break
        if tagger_json is None and tagger_pickle is None:
            raise InputError(f"no averaged_perceptron_tagger(_eng) package under {source}; add NLTK's tagger package")
        if tagger_pickle is not None:
            _copy_tree(tagger_pickle, dest / "taggers" / "averaged_perceptron_tagger")
            done.append("averaged_perceptron_tagger (pickle)")
        if tagger_json is not None:
            _copy_tree(tagger_json, dest / TAGGER_JSON_DIR)
            done.append("averaged_perceptron_tagger_eng")
        else:
            data = (tagger_pickle / "averaged_perceptron_tagger.pickle").read_bytes()  # type: ignore[operator]
            _write_tagger_json(*read_tagger_pickle(data), dest / TAGGER_JSON_DIR)
            done.append("averaged_perceptron_tagger_eng (converted from the pickle)")
        wordnet = None
        for cand in _candidates(source, "wordnet"):
            wordnet = _materialise(cand, work, "index.noun")
            if wordnet:
                break
        if wordnet is None:
            raise InputError(f"no WordNet package under {source}; add NLTK's wordnet package (corpora/wordnet)")
        _copy_tree(wordnet, dest / WORDNET_DIR)
        done.append("wordnet")
        for stem, marker, target in (("punkt_tab", "collocations.tab", "tokenizers/punkt_tab/english"),
                                     ("punkt", "english.pickle", "tokenizers/punkt")):  # fmt: skip
            for cand in _candidates(source, stem):
                found = _materialise(cand, work, marker)
                if found is not None:
                    _copy_tree(found, dest / target)
                    done.append(stem)
                    break
    return done


def download_to(dest: Path) -> list[str]:
    """Download the packages with NLTK's downloader (needs network)."""
    import nltk

    names = ["punkt_tab", "averaged_perceptron_tagger_eng", "wordnet"]
    if tuple(int(p) for p in nltk.__version__.split(".")[:2]) < (3, 9):
        names = ["punkt", "averaged_perceptron_tagger", "wordnet"]
    for name in names:
        if not nltk.download(name, download_dir=str(dest), quiet=True, raise_on_error=True):
            raise InputError(f"downloading NLTK package {name} failed; check the network or use --from DIR")
    return names


def install_data(source: str | os.PathLike[str] | None = None, dest: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Install the exact normaliser's NLTK data into `dest` (default `default_data_dir`); from `source` or online.

    Returns ``{"dest", "installed", "on_nltk_path", "status"}``.
    """
    try:
        import nltk
    except ImportError as exc:
        raise InputError("the exact normaliser needs the nltk package; pip install nltk") from exc
    target = Path(dest) if dest is not None else default_data_dir()
    target.mkdir(parents=True, exist_ok=True)
    installed = install_from(Path(source), target) if source is not None else download_to(target)
    on_path = any(Path(p).resolve() == target.resolve() for p in nltk.data.path if Path(p).exists())
    if not on_path:
        nltk.data.path.insert(0, str(target))
    _build_normaliser.cache_clear()
    status = nltk_status()
    return {"dest": str(target), "installed": installed, "on_nltk_path": on_path, "status": status}
