"""The closed vocabulary of the shapes world, and its CHAIR-style synonym map.

Everything the tiny model can read or say is listed here, so the tokenizer is a plain word-level
table and evaluation can map every caption word back to an object category without heuristics.
"""

from __future__ import annotations

# Object categories (the CHAIR "objects"). Order matters: it fixes token ids and the world's tables.
CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "moon")

# Colours are attributes, not objects: naming a wrong colour is an attribute error, not an object hallucination.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 20),
    "purple": (135, 45, 185),
    "orange": (245, 130, 20),
}

# Coarse positions on a 3x3 grid, answers to "Where is the X?".
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

# Special tokens, in id order: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>, 4 <image>.
UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, IMAGE)

# Words of the prompts and answers; the tokenizer lowercases its input, so everything here is lowercase.
_TEMPLATE_WORDS = ("user", "assistant", ":")
_PUNCTUATION = (".", ",", "?")
_FUNCTION_WORDS = (
    "a", "an", "and", "is", "are", "there", "in", "the", "this", "image", "picture",
    "describe", "what", "which", "colour", "color", "how", "many", "objects", "shapes",
    "where", "yes", "no", "do", "you", "see", "of", "it", "any", "briefly",
)
_POSITION_WORDS = ("top", "bottom", "left", "right", "center")

# Category synonyms a caption may use (CHAIR maps each to its category). The model is trained on the
# canonical names only; the extra forms let CHAIR read captions written by people or other models.
SYNONYMS: dict[str, str] = {
    **{c: c for c in CATEGORIES},
    **{c + "s": c for c in CATEGORIES},
    "ring": "circle",
    "disc": "circle",
    "disk": "circle",
    "dot": "circle",
    "box": "square",
    "rectangle": "square",
    "plus": "cross",
    "rhombus": "diamond",
    "lozenge": "diamond",
    "crescent": "moon",
}


def _dedupe(words: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


# The plain (non-special) vocabulary, in id order after the specials.
WORDS: tuple[str, ...] = tuple(
    _dedupe(
        list(_TEMPLATE_WORDS)
        + list(_PUNCTUATION)
        + list(_FUNCTION_WORDS)
        + list(CATEGORIES)
        + list(COLOURS)
        + list(_POSITION_WORDS)
        + list(NUMBERS)
    )
)


def vocabulary() -> dict[str, int]:
    """Token -> id for the whole world (specials first)."""
    return {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(WORDS))}


def word_to_category(word: str) -> str | None:
    """The object category a caption word names, or None when it names none (CHAIR's synonym lookup)."""
    return SYNONYMS.get(word.lower().strip(".,?!;:"))
