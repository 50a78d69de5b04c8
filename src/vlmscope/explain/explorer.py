"""The attention explorer: one self-contained HTML page (no server, no CDN) to browse an `ExplainResult`.

The page shows the image, the generated tokens as a strip, and the selected token's attention map over the
image; pickers choose a layer or a reduction over layers (mean, max) and a head or a reduction over heads
(mean, max, or the mean over given localization heads); arrows step tokens (left/right) and layers (up/down),
`[` / `]` step heads. The colour scale is shared across tokens (maps comparable) or per map, with a legend.

Data layout embedded in the page (compact, see `page_size_estimate`):

- the raw maps `[steps, layers, heads, grid_h, grid_w]` of the first image grid, each map quantised to uint8
  against its own (min, max), which are stored as float32: one byte per grid cell, base64 (×4/3);
- the image downscaled to at most `image_side` pixels, JPEG.

Reductions run in the browser on the dequantised maps in a fixed order: heads first (with the head op), then
layers (with the layer op), so "layer max, head mean" is the max over layers of the per-layer head mean.
Colour of a cell: perceptual colormap (viridis) at level `round(255 · t)`, t = (value − vmin) / (vmax − vmin),
opacity `(64 + 191 · level / 255) / 255` so low attention leaves the image readable.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from vlmscope.errors import InputError
from vlmscope.explain.maps import ExplainResult
from vlmscope.results import json_safe

# A page above this is refused: browsers keep the decoded maps in memory, and a 100 MB HTML file is no
# longer something one mails to a co-author. Select fewer layers, heads or steps instead.
DEFAULT_MAX_BYTES = 48 * 1024 * 1024
# Opacity of a cell: ALPHA_FLOOR at the bottom of the scale up to 255 at the top (out of 255).
ALPHA_FLOOR = 64
TEMPLATE = "explorer.html"
DATA_MARK = "/*__VLMSCOPE_DATA__*/"


def colormap_lut(name: str = "viridis") -> list[list[int]]:
    """256 RGB entries of a matplotlib colormap (perceptually uniform by default)."""
    from matplotlib import colormaps

    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255).astype(int).tolist()


def quantise(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 codes and float32 [..., 2] (lo, hi) per 2-D map: value ≈ lo + code · (hi − lo) / 255."""
    flat = np.asarray(maps, dtype=np.float64).reshape(*maps.shape[:-2], -1)
    lo = flat.min(axis=-1, keepdims=True)
    hi = flat.max(axis=-1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    codes = np.clip(np.round((flat - lo) / span * 255.0), 0, 255).astype(np.uint8).reshape(maps.shape)
    return codes, np.concatenate([lo, hi], axis=-1).astype(np.float32)


def dequantise(codes: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """The values the page computes from `quantise`'s output (float64, as JavaScript numbers)."""
    lo, hi = limits[..., 0, None, None].astype(np.float64), limits[..., 1, None, None].astype(np.float64)
    return lo + codes.astype(np.float64) * (hi - lo) / 255.0


def page_size_estimate(steps: int, layers: int, heads: int, cells: int, image_bytes: int = 80_000) -> int:
    """Bytes of a page: base64 of one byte per cell and 8 bytes of limits per map, `image_bytes` of embedded
    image (its data URL; a 512 px JPEG photo is typically 40-80 kB), ~20 kB of code, colormap and metadata."""
    maps = steps * layers * heads
    return int(4 / 3 * (maps * cells + maps * 8)) + image_bytes + 20_000


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _image_data_url(image: Any, side: int) -> tuple[str, int, int]:
    picture = image.convert("RGB")
    scale = min(1.0, side / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), *picture.size


def _localization_pairs(result: ExplainResult, heads: Iterable[Sequence[int]] | None) -> list[list[int]]:
    """(layer, head) pairs → [index into result.layers, index into result.heads]; all must be embedded."""
    pairs = []
    for pair in heads or []:
        layer, head = (int(v) for v in pair)
        if layer not in result.layers or head not in result.heads:
            raise InputError(f"localization head L{layer}H{head} is not among the captured layers "
                             f"{result.layers} and heads {result.heads}: capture it (--layers/--heads) or drop it")
        pairs.append([result.layers.index(layer), result.heads.index(head)])
    return pairs


def parse_head_pairs(text: str | None) -> list[tuple[int, int]]:
    """"14:3,15:7" → [(14, 3), (15, 7)] (layer:head)."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        layer, sep, head = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(layer), int(head)))
        except ValueError:
            raise InputError(f"bad head {item.strip()!r}: write layer:head pairs such as 14:3,15:7") from None
    return pairs


def _flow_series(flow: Any) -> dict[str, Any] | None:
    if flow is None:
        return None
    return {"layers": list(flow.layers), "series": {k: list(v) for k, v in flow.attention_shares.items()},
            "title": "attention share of the answer tokens per layer"}


def _panel(result: ExplainResult, label: str | None, hallucinated_steps: Iterable[int]) -> dict[str, Any]:
    """One decoding's part of the page: its answer, tokens and quantised maps."""
    codes, limits = quantise(result.maps)
    decoding = result.params.get("decoding", "greedy")
    return {"label": label or str(decoding), "decoding": decoding, "text": result.text,
            "tokens": list(result.tokens), "steps": list(result.steps), "maps": _b64(codes),
            "limits": _b64(limits.astype("<f4")), "hallucinated": [int(s) for s in hallucinated_steps]}


def _check_comparable(result: ExplainResult, other: ExplainResult) -> None:
    if other.layers != result.layers or other.heads != result.heads:
        raise InputError(f"the compared result has layers {other.layers} and heads {other.heads}, the first "
                         f"{result.layers} and {result.heads}: capture the same layers and heads")
    if other.maps.shape[3:] != result.maps.shape[3:]:
        raise InputError("the compared result has another image grid: compare answers on the same image")


def explorer_data(result: ExplainResult, *, localization_heads: Iterable[Sequence[int]] | None = None,
                  scale: str | None = None, flow: Any = None, title: str | None = None,
                  hallucinated_steps: Iterable[int] = (), image_side: int = 512,
                  compare: ExplainResult | None = None, labels: Sequence[str | None] = (None, None),
                  compare_hallucinated_steps: Iterable[int] = (),
                  _image: tuple[str, int, int] | None = None) -> dict[str, Any]:
    """The JSON document embedded in the page (see the module docstring for the layout)."""
    if result.image is None:
        raise InputError("this result has no image: load it with ExplainResult.load(dir, image=...)")
    scale = scale or result.params.get("scale", "shared")
    if scale not in ("shared", "per-map"):
        raise InputError(f"unknown colour scale {scale!r}: use shared or per-map")
    grid = result.grids[0]
    if compare is not None:
        _check_comparable(result, compare)
    image_url, width, height = _image or _image_data_url(result.image, image_side)
    main = _panel(result, labels[0], hallucinated_steps)
    return {
        "format": 1,
        "title": title or f"{result.model_id}: {result.prompt}",
        "model": result.model_id,
        "prompt": result.prompt,
        **main,
        "compare": _panel(compare, labels[1], compare_hallucinated_steps) if compare is not None else None,
        "layers": list(result.layers),
        "heads": list(result.heads),
        "grid": {"name": grid.name, "height": grid.height, "width": grid.width, "region": list(grid.region),
                 "other_grids": [g.name for g in result.grids[1:]]},
        "image": {"src": image_url, "width": width, "height": height},
        "localization_heads": _localization_pairs(result, localization_heads),
        "scale": scale,
        "colormap": {"name": "viridis", "lut": colormap_lut("viridis"), "alpha_floor": ALPHA_FLOOR},
        "value_label": "attention weight (softmax share of the token's query)",
        "flow": _flow_series(flow),
        "provenance": json_safe(result.provenance),
    }


def build_explorer(result: ExplainResult, *, localization_heads: Iterable[Sequence[int]] | None = None,
                   scale: str | None = None, flow: Any = None, title: str | None = None,
                   hallucinated_steps: Iterable[int] = (), image_side: int = 512,
                   compare: ExplainResult | None = None, labels: Sequence[str | None] = (None, None),
                   compare_hallucinated_steps: Iterable[int] = (), max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The explorer page of `result` as one HTML string (every byte embedded: image, maps, code).

    `localization_heads`: (layer, head) pairs offered as the "localization heads" reduction (e.g. the top of
    a `HeadRanking`); `scale`: "shared" or "per-map" (default: the result's); `flow`: a `FlowResult` whose
    per-layer attention shares are drawn under the map; `hallucinated_steps`: steps whose token is marked
    (wavy underline) as a hallucinated object; `compare`: a second result on the same image, layers and heads
    (another decoding's answer, e.g. `explain_answer` of OPERA's) shown side by side with the same pickers and
    colour scale, `labels` naming the two. Refuses (InputError) a page over `max_bytes`.
    """
    if result.image is None:
        raise InputError("this result has no image: load it with ExplainResult.load(dir, image=...)")
    steps, layers, heads, height, width = result.maps.shape
    image = _image_data_url(result.image, image_side)
    estimate = page_size_estimate(steps, layers, heads, height * width, image_bytes=len(image[0]))
    if compare is not None:
        _check_comparable(result, compare)
        estimate += page_size_estimate(compare.maps.shape[0], layers, heads, height * width, 0) - 20_000
    if estimate > max_bytes:
        raise InputError(f"the page would be about {estimate / 2**20:.0f} MiB ({steps} tokens × {layers} layers × "
                         f"{heads} heads × {height * width} cells), over the {max_bytes / 2**20:.0f} MiB budget: "
                         "select fewer layers, heads or steps (--layers/--heads/--steps)")
    data = explorer_data(result, localization_heads=localization_heads, scale=scale, flow=flow, title=title,
                         hallucinated_steps=hallucinated_steps, image_side=image_side, compare=compare,
                         labels=labels, compare_hallucinated_steps=compare_hallucinated_steps, _image=image)
    # "</" inside a <script> element would end it early; JSON allows the escaped form.
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    template = resources.files("vlmscope.explain").joinpath(TEMPLATE).read_text(encoding="utf-8")
    page = template.replace("__VLMSCOPE_TITLE__", html.escape(data["title"]))
    return page.replace(DATA_MARK, payload)


def save_explorer(result: ExplainResult, path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Write the explorer page (see `build_explorer`) to `path` (.html); returns {path, bytes, seconds}."""
    start = time.perf_counter()
    out = check_page_path(path)
    page = build_explorer(result, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return {"path": str(out), "bytes": out.stat().st_size, "seconds": time.perf_counter() - start}


def check_page_path(path: str | Path) -> Path:
    """An explorer page is one .html file: refuse a directory or another suffix before any work."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{out} is a directory: name the page file, e.g. {out / 'explorer.html'}")
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"{out}: the explorer page is an HTML file, name it e.g. page.html")
    return out


def expected_map(result: ExplainResult, step: int, layer: str | int = "mean", head: str | int = "mean",
                 localization_heads: Iterable[Sequence[int]] | None = None) -> np.ndarray:
    """The map the page shows for one token and picker state, from the float maps (no quantisation).

    `layer` / `head`: a captured layer / head number, or "mean" / "max"; `head="localization"` averages the
    `localization_heads` pairs (and ignores `layer`). Same order as the page: heads first, then layers.
    """
    maps = result.maps[result.steps.index(step)].astype(np.float64)  # [layers, heads, h, w]
    if head == "localization":
        pairs = _localization_pairs(result, localization_heads)
        if not pairs:
            raise InputError("no localization heads given")
        return np.mean([maps[li, hi] for li, hi in pairs], axis=0)
    ops = {"mean": np.mean, "max": np.max}
    by_head = ops[head](maps, axis=1) if isinstance(head, str) else maps[:, result.heads.index(head)]
    return ops[layer](by_head, axis=0) if isinstance(layer, str) else by_head[result.layers.index(layer)]


def explain_answer(vlm: Any, image: Any, prompt: str, answer_ids: Sequence[int], *, layers: Any = "all",
                   heads: Any = "all", decoding: str = "given") -> ExplainResult:
    """What each token of a given answer attended to in the image, from one teacher-forced prefill.

    For a decoding that does not edit attention (greedy, beam search, OPERA: they choose tokens, the forward
    is stock), this equals the attention at generation time: the query that produced answer token k is
    position P − 1 + k of prompt + answer, and causal attention does not see later tokens. `decoding` is the
    label (spec) recorded for the answer. Interventions that edit attention (PAI, AAI, ...) are not covered.
    """
    import torch

    from vlmscope.attention.engine import AttentionPlan, Capture, decoder_attention_modules
    from vlmscope.decoding.session import GenerationRun
    from vlmscope.explain.flow import build_inputs
    from vlmscope.explain.select import check_range, parse_indices
    from vlmscope.images import load_image
    from vlmscope.results import run_provenance

    start = time.perf_counter()
    adapter = vlm.adapter
    if not answer_ids:
        raise InputError("empty answer: nothing to explain")
    layer_ids = check_range(parse_indices(layers, "layer"), adapter.num_layers, "layer")
    head_ids = check_range(parse_indices(heads, "head"), adapter.num_heads, "head")
    pil = load_image(image)
    batch = vlm.encode([pil], [prompt])
    grids = adapter.image_grids(batch, 0)
    inputs = build_inputs(vlm, batch, list(answer_ids))
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    captures = [plan.add_capture(layer, Capture(heads=head_ids, rows="all", columns="image", to_cpu=True))
                for layer in layer_ids]
    with torch.no_grad(), GenerationRun(vlm.model, adapter, inputs.batch, (), capture_plan=plan) as run:
        run.prefill()
    rows = np.arange(len(answer_ids)) + inputs.prompt_len - 1
    # record [1, heads, T, image] → [steps, layers, heads, image]
    raw = np.stack([c.records[0][0][:, rows].float().numpy().transpose(1, 0, 2) for c in captures], axis=1)
    grid_maps = {grid.name: np.ascontiguousarray(grid.take(raw), dtype=np.float32) for grid in grids}
    tokenizer = adapter.tokenizer
    steps = list(range(len(answer_ids)))
    total = time.perf_counter() - start
    return ExplainResult(
        grid_maps=grid_maps, grids=grids, steps=steps, layers=layer_ids, heads=head_ids,
        tokens=[tokenizer.decode([t]) for t in answer_ids],
        text=tokenizer.decode(list(answer_ids), skip_special_tokens=True).strip(), token_ids=list(answer_ids),
        prompt_ids=batch.input_ids[0].tolist(), prompt=prompt, model_id=vlm.model_id, image=pil,
        params={"steps": "all", "layers": layer_ids, "heads": head_ids, "decoding": decoding,
                "teacher_forced": True, "scale": "shared"},
        runtime={"total_seconds": total}, provenance=run_provenance(vlm, wall_seconds=total, answer_from=decoding))

