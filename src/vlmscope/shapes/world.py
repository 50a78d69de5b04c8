"""The shapes world: procedural scenes with known ground truth, and the text about them.

A scene holds 1-4 coloured shapes on a noisy background with grey clutter (lines, dots) that is never
named. Categories are unique within a scene, so "the square" is unambiguous and CHAIR can work on sets.

Co-occurrence bias (the COCO "fork next to a dining table" effect): categories come in pairs
(`WorldConfig.pairs`). When one member of a pair is in a scene, its partner joins it with probability
`p_cooccur`, and a partner that joins this way is often *tucked*: small, placed next to the member and
drawn behind it, so it is partly hidden. A model trained on these scenes learns that a star usually comes
with a moon even when the moon is hard to see, and so sometimes names a moon that is not there.

Everything is seeded: `sample_scene(rng)` draws from a `random.Random`; `render_scene(scene)` is a pure
function of the scene (its background noise comes from a seed stored in the scene).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from vlmscope.shapes.vocab import CATEGORIES, COLOURS, NUMBERS, POSITIONS

Box = tuple[int, int, int, int]

_SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down, for anti-aliased edges


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the scene distribution. The defaults are the distribution the shipped model was trained on."""

    image_size: int = 64
    count_probs: tuple[float, ...] = (0.15, 0.30, 0.30, 0.25)  # P(1 object), ..., P(4 objects)
    size_range: tuple[int, int] = (13, 21)  # object diameter in pixels
    tucked_size_range: tuple[int, int] = (9, 14)
    pairs: tuple[tuple[str, str], ...] = (("star", "moon"), ("heart", "diamond"), ("square", "triangle"))
    p_cooccur: float = 0.8  # P(partner joins | one member drawn and room left)
    p_tucked: float = 0.5  # P(a partner that joined by co-occurrence is small and half hidden)
    min_visible: float = 0.7  # every ordinary object keeps at least this fraction of its pixels visible
    tucked_min_visible: float = 0.35
    typical_colours: tuple[tuple[str, str], ...] = (("moon", "yellow"), ("heart", "red"), ("diamond", "blue"))
    p_typical_colour: float = 0.5
    max_distractors: int = 4  # grey lines and dots, never named
    rotation_jitter: float = 12.0  # degrees

    def partner(self, category: str) -> str | None:
        for a, b in self.pairs:
            if category == a:
                return b
            if category == b:
                return a
        return None


DEFAULT_WORLD = WorldConfig()


@dataclass(frozen=True)
class ShapeObject:
    """One object's ground truth. `box` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive, covering the whole
    shape including any hidden part; `visible` is the fraction of its pixels not covered by later shapes."""

    category: str
    colour: str
    box: Box
    visible: float
    center: tuple[float, float]
    size: float
    rotation: float
    tucked: bool = False

    @property
    def name(self) -> str:
        return f"{self.colour} {self.category}"

    @property
    def box_center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass(frozen=True)
class Distractor:
    kind: str  # "line" or "dot"
    points: tuple[float, ...]
    grey: int
    width: int


@dataclass(frozen=True)
class Scene:
    """A scene: `objects` in drawing order (later ones occlude earlier ones)."""

    objects: tuple[ShapeObject, ...]
    distractors: tuple[Distractor, ...]
    background: tuple[int, int, int]
    noise_seed: int
    image_size: int = 64
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    @property
    def categories(self) -> set[str]:
        return {o.category for o in self.objects}

    @property
    def names(self) -> set[str]:
        return {o.name for o in self.objects}

    def ordered(self) -> list[ShapeObject]:
        """Objects left to right (then top to bottom): the order captions name them in."""
        return sorted(self.objects, key=lambda o: (o.box_center[0], o.box_center[1]))

    def get(self, category: str) -> ShapeObject | None:
        for o in self.objects:
            if o.category == category:
                return o
        return None

    def image(self) -> Image.Image:
        """The rendered RGB image (rendered once, then cached)."""
        if "image" not in self._cache:
            self._cache["image"] = render_scene(self)
        return self._cache["image"]


# ----------------------------------------------------------------------------------------------------------
# Geometry


def _rotate(points: list[tuple[float, float]], degrees: float) -> list[tuple[float, float]]:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _unit_polygon(category: str) -> list[tuple[float, float]]:
    """The outline of a category in unit coordinates (radius ~1 around the origin, y pointing down)."""
    if category == "square":
        h = 0.8
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if category == "triangle":
        return [(math.cos(math.radians(a)), math.sin(math.radians(a)) + 0.15) for a in (-90, 30, 150)]
    if category == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = math.radians(-90 + 36 * k)
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if category == "diamond":
        return [(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]
    if category == "cross":
        w = 0.32
        return [
            (-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
            (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
        ]  # fmt: skip
    if category == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 16.5, -y / 16.5 + 0.1))
        return pts
    raise ValueError(f"no polygon for {category!r}")


def shape_mask(category: str, center: tuple[float, float], size: float, rotation: float, image_size: int) -> np.ndarray:
    """Anti-aliased coverage (0..1 floats, shape image_size x image_size) of one shape."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (image_size * ss, image_size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center[0] * ss, center[1] * ss
    r = size / 2.0 * ss
    if category == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif category == "moon":
        # A crescent: a disc with an offset, slightly smaller disc cut out of it.
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        (ox, oy) = _rotate([(0.45, -0.2)], rotation)[0]
        ri = 0.85 * r
        draw.ellipse([cx + ox * r - ri, cy + oy * r - ri, cx + ox * r + ri, cy + oy * r + ri], fill=0)
    else:
        pts = _rotate(_unit_polygon(category), rotation)
        draw.polygon([(cx + x * r, cy + y * r) for x, y in pts], fill=255)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _mask_box(mask: np.ndarray, threshold: float = 0.25) -> Box | None:
    ys, xs = np.nonzero(mask > threshold)
    if len(xs) == 0:
        return None
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _visibilities(masks: list[np.ndarray]) -> list[float]:
    """Fraction of each mask's coverage that no later mask covers."""
    out = []
    for i, m in enumerate(masks):
        cover = np.ones_like(m)
        for later in masks[i + 1 :]:
            cover = cover * (1.0 - later)
        total = float(m.sum())
        out.append(float((m * cover).sum()) / total if total > 0 else 0.0)
    return out


# ----------------------------------------------------------------------------------------------------------
# Sampling


def _sample_categories(rng: random.Random, n: int, cfg: WorldConfig) -> list[tuple[str, bool, str | None]]:
    """Pick n distinct categories with the co-occurrence bias. Returns (category, tucked, anchor) triples,
    where anchor is the category a tucked partner hides behind."""
    chosen: list[tuple[str, bool, str | None]] = []
    present: set[str] = set()
    while len(chosen) < n:
        c = rng.choice([c for c in CATEGORIES if c not in present])
        chosen.append((c, False, None))
        present.add(c)
        p = cfg.partner(c)
        if p is not None and p not in present and len(chosen) < n and rng.random() < cfg.p_cooccur:
            tucked = rng.random() < cfg.p_tucked
            chosen.append((p, tucked, c if tucked else None))
            present.add(p)
    return chosen


def _sample_colour(rng: random.Random, category: str, cfg: WorldConfig) -> str:
    typical = dict(cfg.typical_colours).get(category)
    if typical is not None and rng.random() < cfg.p_typical_colour:
        return typical
    return rng.choice(list(COLOURS))


def _sample_distractors(rng: random.Random, cfg: WorldConfig) -> tuple[Distractor, ...]:
    s = cfg.image_size
    out = []
    for _ in range(rng.randint(0, cfg.max_distractors)):
        grey = rng.randint(70, 170)
        if rng.random() < 0.5:
            x0, y0 = rng.uniform(0, s), rng.uniform(0, s)
            ang, length = rng.uniform(0, 2 * math.pi), rng.uniform(8, 30)
            pts = (x0, y0, x0 + length * math.cos(ang), y0 + length * math.sin(ang))
            out.append(Distractor("line", pts, grey, 1))
        else:
            r = rng.uniform(0.8, 2.0)
            out.append(Distractor("dot", (rng.uniform(2, s - 2), rng.uniform(2, s - 2), r), grey, 1))
    return tuple(out)


def sample_scene(rng: random.Random, cfg: WorldConfig = DEFAULT_WORLD) -> Scene:
    """Draw one scene. Deterministic given the state of `rng`."""
    n = rng.choices(range(1, len(cfg.count_probs) + 1), weights=cfg.count_probs)[0]
    while True:  # rejection sampling of a layout; almost always succeeds within a few tries
        picks = _sample_categories(rng, n, cfg)
        scene = _place(rng, picks, cfg)
        if scene is not None:
            return scene


def _place(rng: random.Random, picks: list[tuple[str, bool, str | None]], cfg: WorldConfig) -> Scene | None:
    s = cfg.image_size
    # Ordinary objects are drawn in a random order; a tucked partner is drawn just before its anchor, so the
    # anchor covers part of it.
    ordinary = [p for p in picks if not p[1]]
    rng.shuffle(ordinary)
    order: list[tuple[str, bool, str | None]] = []
    for p in ordinary:
        order.extend(q for q in picks if q[1] and q[2] == p[0])
        order.append(p)

    # Sizes and positions: place anchors first so tucked partners can be put next to them.
    placed: dict[str, tuple[tuple[float, float], float, float]] = {}
    placement_order = [p for p in order if not p[1]] + [p for p in order if p[1]]
    for cat, tucked, anchor in placement_order:
        lo, hi = cfg.tucked_size_range if tucked else cfg.size_range
        size = rng.uniform(lo, hi)
        rot = rng.uniform(-cfg.rotation_jitter, cfg.rotation_jitter)
        margin = size / 2 + 1
        ok = False
        for _ in range(60):
            if tucked and anchor in placed:
                (ax, ay), asize, _r = placed[anchor]
                ang = rng.uniform(0, 2 * math.pi)
                dist = (asize + size) / 2 * rng.uniform(0.45, 0.9)
                cx, cy = ax + dist * math.cos(ang), ay + dist * math.sin(ang)
                if not (margin <= cx <= s - margin and margin <= cy <= s - margin):
                    continue
            else:
                cx, cy = rng.uniform(margin, s - margin), rng.uniform(margin, s - margin)
            # Ordinary objects keep their distance from each other (bounded overlap is checked below).
            if any(
                math.hypot(cx - px, cy - py) < (size + psize) / 2 * 0.8
                for (px, py), psize, _ in placed.values()
                if not tucked
            ):
                continue
            placed[cat] = ((cx, cy), size, rot)
            ok = True
            break
        if not ok:
            return None

    masks = [shape_mask(cat, placed[cat][0], placed[cat][1], placed[cat][2], s) for cat, _, _ in order]
    vis = _visibilities(masks)
    for (_cat, tucked, _), v in zip(order, vis):
        if v < (cfg.tucked_min_visible if tucked else cfg.min_visible):
            return None
    # A tucked partner must really be partly hidden, otherwise it is just a small object.
    for (_cat, tucked, _), v in zip(order, vis):
        if tucked and v > 0.9:
            return None

    objects = []
    for (cat, tucked, _), m, v in zip(order, masks, vis):
        box = _mask_box(m)
        if box is None:
            return None
        center, size, rot = placed[cat]
        objects.append(
            ShapeObject(
                category=cat,
                colour=_sample_colour(rng, cat, cfg),
                box=box,
                visible=round(v, 4),
                center=(round(center[0], 3), round(center[1], 3)),
                size=round(size, 3),
                rotation=round(rot, 3),
                tucked=tucked,
            )
        )
    # Distinct colours for a tucked partner and its anchor, or the partner would melt into it.
    for i, o in enumerate(objects):
        if o.tucked and i + 1 < len(objects) and objects[i + 1].colour == o.colour:
            others = [c for c in COLOURS if c != o.colour]
            objects[i + 1] = _replace_colour(objects[i + 1], rng.choice(others))
    grey = rng.randint(200, 245)
    tint = tuple(max(0, min(255, grey + rng.randint(-8, 8))) for _ in range(3))
    return Scene(
        objects=tuple(objects),
        distractors=_sample_distractors(rng, cfg),
        background=tint,  # type: ignore[arg-type]
        noise_seed=rng.getrandbits(32),
        image_size=s,
    )


def _replace_colour(o: ShapeObject, colour: str) -> ShapeObject:
    return ShapeObject(o.category, colour, o.box, o.visible, o.center, o.size, o.rotation, o.tucked)


def sample_scenes(n: int, seed: int, split: str = "test", cfg: WorldConfig = DEFAULT_WORLD) -> list[Scene]:
    """`n` scenes from a seeded stream. Each split ("train", "test", ...) is its own stream, so held-out
    scenes never repeat the training stream for the same seed."""
    rng = random.Random(f"shapes:{split}:{seed}")
    return [sample_scene(rng, cfg) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------
# Rendering


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of a scene; a pure function of the scene."""
    s = scene.image_size
    nrng = np.random.default_rng(scene.noise_seed)
    img = np.empty((s, s, 3), dtype=np.float32)
    img[:] = np.asarray(scene.background, dtype=np.float32)
    # A gentle brightness gradient plus pixel noise, so the background is never a flat colour.
    gx, gy = nrng.uniform(-12, 12, size=2)
    ramp = (np.arange(s, dtype=np.float32) / s - 0.5)
    img += (gx * ramp[None, :] + gy * ramp[:, None])[..., None]
    img += nrng.normal(0.0, 4.0, size=img.shape).astype(np.float32)

    if scene.distractors:
        clutter = Image.new("L", (s, s), 0)
        shade = Image.new("L", (s, s), 0)
        dc, ds = ImageDraw.Draw(clutter), ImageDraw.Draw(shade)
        for d in scene.distractors:
            if d.kind == "line":
                dc.line(list(d.points), fill=255, width=d.width)
                ds.line(list(d.points), fill=d.grey, width=d.width)
            else:
                x, y, r = d.points
                dc.ellipse([x - r, y - r, x + r, y + r], fill=255)
                ds.ellipse([x - r, y - r, x + r, y + r], fill=d.grey)
        a = np.asarray(clutter, dtype=np.float32)[..., None] / 255.0
        g = np.asarray(shade, dtype=np.float32)[..., None]
        img = img * (1 - a) + g * a

    for o in scene.objects:
        m = shape_mask(o.category, o.center, o.size, o.rotation, s)[..., None]
        colour = np.asarray(COLOURS[o.colour], dtype=np.float32)
        # Slight per-pixel shading so colour is not a single exact RGB value.
        img = img * (1 - m) + (colour + nrng.normal(0.0, 6.0, size=(s, s, 3)).astype(np.float32)) * m
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), mode="RGB")


def visible_masks(scene: Scene) -> list[np.ndarray]:
    """Per object (drawing order), the coverage of its pixels that stay visible after later shapes."""
    s = scene.image_size
    masks = [shape_mask(o.category, o.center, o.size, o.rotation, s) for o in scene.objects]
    out = []
    for i, m in enumerate(masks):
        v = m.copy()
        for later in masks[i + 1 :]:
            v *= 1.0 - later
        out.append(v)
    return out


def patch_labels(scene: Scene, grid: int, min_cover: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Dense ground truth on the image-token grid: for each patch, 1 + the index in CATEGORIES (and 1 + the
    index in COLOURS) of the object covering most of it, or 0 where no object covers `min_cover` of it."""
    s = scene.image_size
    p = s // grid
    cats = np.zeros((grid, grid), dtype=np.int64)
    cols = np.zeros((grid, grid), dtype=np.int64)
    if not scene.objects:
        return cats, cols
    cover = np.stack([m.reshape(grid, p, grid, p).mean(axis=(1, 3)) for m in visible_masks(scene)])
    best = cover.argmax(0)
    keep = cover.max(0) >= min_cover
    colour_names = list(COLOURS)
    for i, o in enumerate(scene.objects):
        sel = keep & (best == i)
        cats[sel] = CATEGORIES.index(o.category) + 1
        cols[sel] = colour_names.index(o.colour) + 1
    # A small object behind a bigger one may dominate no patch: give it its best-covered patch, so every
    # object leaves a trace on the grid.
    for i, o in enumerate(scene.objects):
        if not (cats == CATEGORIES.index(o.category) + 1).any():
            r, c = np.unravel_index(cover[i].argmax(), cover[i].shape)
            cats[r, c] = CATEGORIES.index(o.category) + 1
            cols[r, c] = colour_names.index(o.colour) + 1
    return cats, cols


# ----------------------------------------------------------------------------------------------------------
# Text: captions and questions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(o: ShapeObject, with_colour: bool = True) -> str:
    words = f"{o.colour} {o.category}" if with_colour else o.category
    return f"{_article(words)} {words}"


def caption(scene: Scene) -> str:
    """The reference caption: every object, left to right, e.g. "a red circle , a blue square and a green
    triangle ." (punctuation is space-separated, matching the word-level tokenizer)."""
    parts = [_phrase(o) for o in scene.ordered()]
    if len(parts) == 1:
        body = parts[0]
    else:
        body = " , ".join(parts[:-1]) + " and " + parts[-1]
    return body + " ."


def position_of(o: ShapeObject, image_size: int) -> str:
    """Coarse 3x3 position of an object's box centre ("top left", "center", ...)."""
    cx, cy = o.box_center
    col = min(2, int(3 * cx / image_size))
    row = min(2, int(3 * cy / image_size))
    return POSITIONS[row * 3 + col]


CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "Describe this image.",
    "What is in the image?",
    "What do you see?",
    "Describe the picture briefly.",
)
DEFAULT_CAPTION_PROMPT = CAPTION_PROMPTS[0]


def existence_question(category: str, colour: str | None = None) -> str:
    """POPE-style question, e.g. "Is there a circle in the image?" or "Is there a red circle in the image?"."""
    words = f"{colour} {category}" if colour else category
    return f"Is there {_article(words)} {words} in the image?"


@dataclass(frozen=True)
class Question:
    """A question about a scene and its ground-truth answer text (which ends with " .")."""

    text: str
    answer: str
    kind: str  # "caption", "exist", "exist_colour", "colour", "where", "count"
    label: bool | None = None  # for yes/no questions
    category: str | None = None  # the object asked about, if any


def _yes_no(b: bool) -> str:
    return "yes ." if b else "no ."


def category_frequencies(n: int = 4000, seed: int = 12345, cfg: WorldConfig = DEFAULT_WORLD) -> dict[str, float]:
    """Empirical P(category present) in the world (for POPE's "popular" negatives)."""
    scenes = sample_scenes(n, seed, split="stats", cfg=cfg)
    return {c: sum(c in sc.categories for sc in scenes) / n for c in CATEGORIES}


def pope_questions(
    scene: Scene,
    rng: random.Random,
    strategy: str = "random",
    n_pos: int = 3,
    cfg: WorldConfig = DEFAULT_WORLD,
    popularity: dict[str, float] | None = None,
) -> list[Question]:
    """POPE-style yes/no questions for one scene: up to `n_pos` present categories and as many absent ones.

    Negatives by `strategy`: "random" (any absent category), "popular" (the most frequent absent categories
    in the world), "adversarial" (absent co-occurrence partners of present objects first, then random).
    """
    present = [o.category for o in scene.ordered()]
    absent = [c for c in CATEGORIES if c not in scene.categories]
    pos = rng.sample(present, min(n_pos, len(present)))
    k = len(pos)
    if strategy == "random":
        neg = rng.sample(absent, min(k, len(absent)))
    elif strategy == "popular":
        pop = popularity or category_frequencies(cfg=cfg)
        neg = sorted(absent, key=lambda c: (-pop[c], c))[:k]
    elif strategy == "adversarial":
        partners = [p for c in present if (p := cfg.partner(c)) is not None and p in absent]
        rest = [c for c in absent if c not in partners]
        rng.shuffle(rest)
        neg = (partners + rest)[:k]
    else:
        raise ValueError(f"unknown POPE strategy {strategy!r} (random, popular, adversarial)")
    qs = [Question(existence_question(c), "yes .", "exist", True, c) for c in pos]
    qs += [Question(existence_question(c), "no .", "exist", False, c) for c in neg]
    return qs


def training_question(scene: Scene, rng: random.Random, cfg: WorldConfig = DEFAULT_WORLD) -> Question:
    """One random question (with answer) about a scene, from the training task mix."""
    r = rng.random()
    ordered = scene.ordered()
    if r < 0.40:
        return Question(rng.choice(CAPTION_PROMPTS), caption(scene), "caption")
    if r < 0.70:
        # Existence by category: half positive, half negative; negatives favour absent co-occurrence
        # partners, so the model has to look rather than lean on the prior.
        if rng.random() < 0.5:
            c = rng.choice(ordered).category
            return Question(existence_question(c), "yes .", "exist", True, c)
        absent = [c for c in CATEGORIES if c not in scene.categories]
        partners = [p for o in ordered if (p := cfg.partner(o.category)) in absent]
        c = rng.choice(partners) if partners and rng.random() < 0.5 else rng.choice(absent)
        return Question(existence_question(c), "no .", "exist", False, c)
    if r < 0.80:
        # Existence of a coloured object; negatives are mostly a present shape in another colour.
        o = rng.choice(ordered)
        if rng.random() < 0.5:
            return Question(existence_question(o.category, o.colour), "yes .", "exist_colour", True, o.category)
        if rng.random() < 0.7:
            colour = rng.choice([c for c in COLOURS if c != o.colour])
            return Question(existence_question(o.category, colour), "no .", "exist_colour", False, o.category)
        absent = [c for c in CATEGORIES if c not in scene.categories]
        c = rng.choice(absent)
        return Question(existence_question(c, rng.choice(list(COLOURS))), "no .", "exist_colour", False, c)
    if r < 0.90:
        o = rng.choice(ordered)
        word = rng.choice(("colour", "color"))
        return Question(f"What {word} is the {o.category}?", f"{o.colour} .", "colour", None, o.category)
    if r < 0.96:
        o = rng.choice(ordered)
        return Question(f"Where is the {o.category}?", f"{position_of(o, scene.image_size)} .", "where", None, o.category)
    q = rng.choice(("How many objects are there?", "How many shapes are in the image?"))
    return Question(q, f"{NUMBERS[len(scene.objects)]} .", "count")
