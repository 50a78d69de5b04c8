"""Building a redundancy codebook (the reference's construction pipeline, experiments/).

Per image, for every visual token (post-projector, the model's own features):
1. single-token test: the prompt with only that token as the image; p_top1 = top-1 probability of the first
   answer token renormalised over the 50 highest logits (a first token equal to `skip_first_token`, "A" as
   in "A dog ...", is skipped and the next token's logits are used);
2. local leave-one-out: the token's 3×3 neighbourhood (shifted inward at borders, raster order) as the whole
   image, against the same 9 tokens with the target replaced by the pad token's input embedding;
3. global leave-one-out: all image tokens, against all of them with the whole 3×3 neighbourhood replaced by the
   pad embedding;
4. divergences of the first-token logits (`divergence.reference_divergence`, or the textbook JSD);
5. low information iff k_context·D_local + k_global·D_global < jsd_value_thres and p_top1 < top1_prob_thres;
6. DPC-KNN over all tokens of the image (cluster_nums clusters): the low-information members of clusters with
   at most cluster_size_thres members are the image's candidates.
Then over all images:
7. DPC-KNN over the union of candidates (prototype_cluster_nums clusters); every member of a cluster drawing on
   more than prototype_min_unique_sample_thres distinct images is a prototype.

Per-image results are appended to a JSON-lines side store next to the output (`OUT.parts.jsonl`) as soon as
an image is done, so an interrupted build resumes where it stopped. The reference ranks the patches by their
similarity to the ViT [CLS] state before the single-token test; that only sets the order in which tokens are
probed and does not change any result, so it is not reproduced.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vlmscope.codebook.divergence import divergence, top1_probability
from vlmscope.codebook.dpc_knn import dpc_knn
from vlmscope.codebook.features import SpanLayout, check_family, image_features, span_layout
from vlmscope.codebook.io import save_codebook
from vlmscope.errors import InputError, VlmscopeError
from vlmscope.images import list_image_files, load_image

PARTS_FORMAT = "vlmscope.codebook-parts/1"
REFERENCE_PROMPT = "What does this image show? You must provide a single word that best describes the image."

# The shipped construction settings (reference table); "script" is the scripts' default (2025-05).
PRESETS: dict[str, dict[str, Any]] = {
    "script": dict(top1_prob_thres=0.077, jsd_value_thres=1.8e-3, cluster_size_thres=8,
                   prototype_cluster_nums=64, prototype_min_unique_sample_thres=64),
    "llava15": dict(top1_prob_thres=0.15, jsd_value_thres=2e-3, cluster_size_thres=8,
                    prototype_cluster_nums=64, prototype_min_unique_sample_thres=64),
    "llava-next": dict(top1_prob_thres=0.1, jsd_value_thres=2e-3, cluster_size_thres=8,
                       prototype_cluster_nums=64, prototype_min_unique_sample_thres=64),
    "llava-ov": dict(top1_prob_thres=0.08, jsd_value_thres=1.8e-3, cluster_size_thres=3,
                     prototype_cluster_nums=24, prototype_min_unique_sample_thres=16),
}

# Settings that only affect the global stage (or speed) may change between resumed runs.
_GLOBAL_ONLY = {"prototype_cluster_nums", "prototype_min_unique_sample_thres", "batch_size"}


@dataclass
class BuildSettings:
    """Construction settings; the defaults are the reference scripts' (see PRESETS for the shipped ones)."""

    prompt: str = REFERENCE_PROMPT
    top1_prob_thres: float = 0.077
    jsd_value_thres: float = 1.8e-3
    k_context: float = 1.0
    k_global: float = 16.0
    cluster_nums: int = 8
    cluster_size_thres: int = 8
    prototype_cluster_nums: int = 64
    prototype_min_unique_sample_thres: int = 64
    knn: int = 5
    top1_top_k: int = 50
    divergence_top_k: int = 10
    divergence: Literal["reference", "jsd"] = "reference"
    skip_first_token: str | None = "A"
    pad_token_id: int | None = None  # None: the tokenizer's pad token (the reference used 0 for LLaVA-1.5)
    seed: int = 0
    batch_size: int = 16

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BuildSettings:
        if name not in PRESETS:
            raise InputError(f"unknown codebook preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def __post_init__(self) -> None:
        for name in ("cluster_nums", "cluster_size_thres", "prototype_cluster_nums", "knn", "top1_top_k",
                     "divergence_top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"codebook setting {name} must be at least 1, got {getattr(self, name)}")
        if self.divergence not in ("reference", "jsd"):
            raise InputError(f"divergence must be 'reference' or 'jsd', got {self.divergence!r}")

    def per_image(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _GLOBAL_ONLY}


@dataclass
class ImageRecord:
    """The per-image results kept in the side store."""

    image: str
    span_indices: list[int]  # span index of each probed (grid) token
    locations: list[tuple[str, int, int]]  # (grid, row, col) of each probed token
    p_top1: list[float]
    d_local: list[float]
    d_global: list[float]
    low_info: list[bool]
    labels: list[int]  # per-image DPC-KNN cluster of each token
    selected: list[int]  # indices into the probed tokens
    features: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0), np.float32))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("features")
        feats = np.ascontiguousarray(self.features, dtype="<f4")
        data["features"] = {"shape": list(feats.shape), "f32le": base64.b64encode(feats.tobytes()).decode()}
        return {"kind": "image", **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRecord:
        blob = data["features"]
        feats = np.frombuffer(base64.b64decode(blob["f32le"]), dtype="<f4").reshape(blob["shape"])
        kwargs = {f.name: data[f.name] for f in fields(cls) if f.name != "features"}
        kwargs["locations"] = [tuple(loc) for loc in kwargs["locations"]]
        return cls(**kwargs, features=feats.astype(np.float32))


@dataclass
class BuildResult:
    path: Path
    prototypes: int
    candidates: int
    images: int
    computed: list[str]  # images analysed in this run (the others came from the side store)


def parts_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts.jsonl")


def list_images(images: str | Path | Sequence[str | Path], num_images: int | None = None) -> list[Path]:
    """Image files of a directory (sorted by name) or an explicit list; the first `num_images` of them."""
    if num_images is not None and num_images < 1:
        raise InputError(f"--num-images must be at least 1, got {num_images}")
    if isinstance(images, str | Path):
        paths = list_image_files(images)
    else:
        paths = [Path(p) for p in images]
        if not paths:
            raise InputError("no images given")
    return paths[:num_images] if num_images else paths


# --- probing the model -----------------------------------------------------------------------------------
class Prober:
    """First-answer-token logits for prompts whose image span is replaced by arbitrary embeddings."""

    def __init__(self, vlm: Any, settings: BuildSettings) -> None:
        self.vlm = vlm
        self.model = vlm.model
        self.settings = settings
        self.embed = self.model.get_input_embeddings()
        tokenizer = vlm.adapter.tokenizer
        pad_id = settings.pad_token_id if settings.pad_token_id is not None else tokenizer.pad_token_id
        if pad_id is None:
            raise InputError("the tokenizer has no pad token: give pad_token_id (--pad-token-id)")
        vocab = self.embed.weight.shape[0]
        if not 0 <= int(pad_id) < vocab:
            raise InputError(f"pad token id {pad_id} is outside the vocabulary (0..{vocab - 1})")
        self.pad_embedding = self._embed([int(pad_id)])[0]
        self.skip_id = _single_token_id(tokenizer, settings.skip_first_token)

    def _embed(self, ids: Sequence[int]) -> torch.Tensor:
        return self.embed(torch.tensor(list(ids), device=self.vlm.device))

    def text_parts(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the prompt before and after the image span (one unpadded row)."""
        ids = batch.input_ids[0]
        positions = batch.image_mask[0].nonzero().flatten()
        start, end = int(positions[0]), int(positions[-1]) + 1
        return self._embed(ids[:start].tolist()), self._embed(ids[end:].tolist())

    def logits(self, make_images: Callable[[int, int], torch.Tensor], count: int, prefix: torch.Tensor,
               suffix: torch.Tensor) -> torch.Tensor:
        """[count, V] float32: last-position logits for prompts prefix + make_images(lo, hi)[i] + suffix."""
        out = []
        for lo in range(0, count, self.settings.batch_size):
            hi = min(count, lo + self.settings.batch_size)
            images = make_images(lo, hi).to(prefix.dtype)
            n = images.shape[0]
            embeds = torch.cat([prefix.expand(n, -1, -1), images, suffix.expand(n, -1, -1)], dim=1)
            length = embeds.shape[1]
            mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
            positions = torch.arange(length, device=embeds.device).expand(n, -1)
            result = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                use_cache=False, logits_to_keep=1, return_dict=True)
            out.append(result.logits[:, -1].float())
        return torch.cat(out, dim=0)


def _single_token_id(tokenizer: Any, word: str | None) -> int | None:
    """The id of `word` as one token (SentencePiece: "▁A"), or None when it is not a single known token."""
    if not word:
        return None
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        return None
    return int(ids[0])


def neighbourhood(layout: SpanLayout, grid_name: str, row: int, col: int) -> np.ndarray:
    """Span indices of the 3×3 window around (row, col), shifted inward at the borders, raster order."""
    grid = next(g for g in layout.grids if g.name == grid_name)
    r0 = min(max(row - 1, 0), max(grid.height - 3, 0))
    c0 = min(max(col - 1, 0), max(grid.width - 3, 0))
    return grid.indices()[r0:r0 + 3, c0:c0 + 3].ravel()


def analyse_image(prober: Prober, image: Any, name: str) -> ImageRecord:
    """Steps 1–6 for one image."""
    settings = prober.settings
    vlm = prober.vlm
    batch = vlm.encode([image], [settings.prompt])
    feats = image_features(vlm.model, batch)[0]
    layout = span_layout(vlm.adapter, batch, 0)
    prefix, suffix = prober.text_parts(batch)
    content = torch.as_tensor(layout.content, device=feats.device)
    tokens = feats[content]
    count = len(content)
    pad = prober.pad_embedding.to(feats.dtype)

    # 1. single-token test
    first = prober.logits(lambda lo, hi: tokens[lo:hi, None], count, prefix, suffix)
    if prober.skip_id is not None:
        skip_rows = (first.argmax(dim=-1) == prober.skip_id).nonzero().flatten()
        if len(skip_rows):
            longer = torch.cat([suffix, prober._embed([prober.skip_id])], dim=0)
            first[skip_rows] = prober.logits(lambda lo, hi: tokens[skip_rows[lo:hi], None], len(skip_rows),
                                             prefix, longer)
    p_top1 = top1_probability(first, settings.top1_top_k)

    # 2. local leave-one-out: windows are shared by border tokens, so run each distinct one once.
    locations = [layout.locate(int(i)) for i in layout.content]
    windows = [neighbourhood(layout, *loc) for loc in locations]
    keys = sorted({tuple(w.tolist()) for w in windows})
    key_index = {k: i for i, k in enumerate(keys)}
    key_tensor = torch.as_tensor(keys, device=feats.device)
    window_tensor = torch.as_tensor(np.stack(windows), device=feats.device)
    target_slot = torch.as_tensor([int(np.nonzero(w == i)[0][0]) for w, i in zip(windows, layout.content)],
                                  device=feats.device)
    local_a = prober.logits(lambda lo, hi: feats[key_tensor[lo:hi]], len(keys), prefix, suffix)

    def ablated_windows(lo: int, hi: int) -> torch.Tensor:
        block = feats[window_tensor[lo:hi]].clone()
        block[torch.arange(hi - lo, device=feats.device), target_slot[lo:hi]] = pad
        return block

    local_b = prober.logits(ablated_windows, count, prefix, suffix)
    a_rows = torch.as_tensor([key_index[tuple(w.tolist())] for w in windows], device=local_a.device)
    d_local = divergence(local_a[a_rows], local_b, settings.divergence, settings.divergence_top_k)

    # 3. global leave-one-out: the whole span, with the target's 3×3 neighbourhood blanked.
    global_a = prober.logits(lambda lo, hi: feats[None], 1, prefix, suffix)

    def ablated_images(lo: int, hi: int) -> torch.Tensor:
        block = feats[None].repeat(hi - lo, 1, 1)
        for j, w in enumerate(windows[lo:hi]):
            block[j, torch.as_tensor(w, device=feats.device)] = pad
        return block

    global_b = prober.logits(ablated_images, count, prefix, suffix)
    d_global = divergence(global_a.expand(count, -1), global_b, settings.divergence, settings.divergence_top_k)

    # 5. low-information rule
    combined = settings.k_context * d_local + settings.k_global * d_global
    low_info = (combined < settings.jsd_value_thres) & (p_top1 < settings.top1_prob_thres)

    # 6. per-image DPC-KNN over all tokens; low-info members of small clusters are the candidates.
    labels, _ = dpc_knn(tokens, settings.cluster_nums, k=settings.knn, seed=_image_seed(settings.seed, name))
    sizes = torch.bincount(labels, minlength=int(labels.max()) + 1)
    small = sizes[labels] <= settings.cluster_size_thres
    selected = (small & low_info.to(small.device)).nonzero().flatten()
    return ImageRecord(
        image=name,
        span_indices=[int(i) for i in layout.content],
        locations=locations,
        p_top1=p_top1.tolist(),
        d_local=d_local.tolist(),
        d_global=d_global.tolist(),
        low_info=low_info.tolist(),
        labels=labels.tolist(),
        selected=selected.tolist(),
        features=tokens[selected].float().cpu().numpy(),
    )


def _image_seed(seed: int, name: str) -> int:
    # Per image, independent of processing order, so resumed and fresh builds cluster identically.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


# --- the side store --------------------------------------------------------------------------------------
class PartsStore:
    """Append-only JSON lines: a header with the per-image settings, then one record per finished image."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.header = {"kind": "header", "format": PARTS_FORMAT, **header}
        self.records: dict[str, ImageRecord] = {}
        if path.is_file() and path.stat().st_size > 0:
            self._read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append(self.header)

    def _read(self) -> None:
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0])
        except (ValueError, IndexError):
            header = None
        if header is None and len(lines) == 1:
            # Interrupted while writing the header: nothing was stored yet.
            self.path.write_text("")
            self._append(self.header)
            return
        if header != self.header:
            raise InputError(
                f"{self.path} was written by a build with another model or other per-image settings: "
                "delete it to start over, or choose another --out"
            )
        for line in lines[1:]:
            try:
                data = json.loads(line)
                record = ImageRecord.from_json(data)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted write: that image is analysed again
            self.records[record.image] = record

    def _append(self, obj: dict[str, Any]) -> None:
        text = json.dumps(obj, separators=(",", ":")) + "\n"
        with open(self.path, "a+b") as handle:
            # After an interrupted write the file may end mid-line: start on a fresh line.
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            handle.write(text.encode())
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, record: ImageRecord) -> None:
        self._append(record.to_json())
        self.records[record.image] = record


# --- the whole pipeline ----------------------------------------------------------------------------------
def build_codebook(vlm: Any, images: str | Path | Sequence[str | Path], out: str | Path,
                   settings: BuildSettings | None = None, num_images: int | None = None,
                   progress: bool = False, on_image: Callable[[str], None] | None = None) -> BuildResult:
    """Build a codebook from a directory (or list) of images and write OUT (+ OUT's .json sidecar).

    `on_image(name)` is called after each newly analysed image has been stored (progress reporting; tests use
    it to interrupt a build).
    """
    settings = settings or BuildSettings()
    check_family(vlm.adapter, "codebook construction")
    paths = list_images(images, num_images)
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise InputError("image file names must be unique (they identify the images in the side store)")
    out = Path(out)
    width = int(vlm.model.get_input_embeddings().weight.shape[1])
    store = PartsStore(parts_path(out), {"model": vlm.model_id, "width": width, "settings": settings.per_image()})
    prober = Prober(vlm, settings)
    computed: list[str] = []
    with torch.no_grad():
        for path in _progress(paths, store, progress):
            if path.name in store.records:
                continue
            record = analyse_image(prober, load_image(path), path.name)
            store.add(record)
            computed.append(path.name)
            if on_image is not None:
                on_image(path.name)
        records = [store.records[name] for name in names]
        prototypes, meta = select_prototypes(records, settings)
    meta.update(model=vlm.model_id, images=names, settings=asdict(settings))
    save_codebook(out, prototypes, meta)
    return BuildResult(out, int(prototypes.shape[0]), int(meta["candidates"]), len(names), computed)


def _progress(paths: list[Path], store: PartsStore, enabled: bool) -> Iterator[Path]:
    from tqdm import tqdm

    done = sum(1 for p in paths if p.name in store.records)
    with tqdm(total=len(paths), initial=done, desc="codebook", unit="image", disable=not enabled) as bar:
        for path in paths:
            fresh = path.name not in store.records
            yield path
            if fresh:
                bar.update(1)


def select_prototypes(records: Sequence[ImageRecord], settings: BuildSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    """Step 7: global DPC-KNN over all candidates; keep clusters drawing on enough distinct images."""
    sources = [(rec, i) for rec in records for i in rec.selected]
    if not sources:
        raise VlmscopeError(
            f"no low-information tokens in {len(records)} images: add images or relax --top1-prob-thres "
            f"({settings.top1_prob_thres}) / --jsd-value-thres ({settings.jsd_value_thres})"
        )
    feats = torch.from_numpy(np.concatenate([rec.features for rec in records if len(rec.selected)], axis=0))
    labels, _ = dpc_knn(feats, settings.prototype_cluster_nums, k=settings.knn, seed=settings.seed)
    kept: list[int] = []
    clusters: list[int] = []
    for cluster in range(int(labels.max()) + 1):
        members = (labels == cluster).nonzero().flatten().tolist()
        unique = {sources[m][0].image for m in members}
        if len(unique) > settings.prototype_min_unique_sample_thres:
            kept += members
            clusters += [cluster] * len(members)
    if not kept:
        raise VlmscopeError(
            f"no prototype survived: {len(sources)} candidate tokens from {len(records)} images, but no cluster "
            f"draws on more than {settings.prototype_min_unique_sample_thres} images: add images or lower "
            "--prototype-min-unique"
        )
    entries = []
    for m, cluster in zip(kept, clusters):
        rec, i = sources[m]
        grid, row, col = rec.locations[i]
        entries.append({"image": rec.image, "span_index": rec.span_indices[i], "grid": grid, "row": row,
                        "col": col, "cluster": cluster})
    meta = {"candidates": len(sources), "prototypes": entries}
    return feats[kept], meta
