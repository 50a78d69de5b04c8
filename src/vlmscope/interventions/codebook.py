"""Visual-token pruning with a redundancy codebook (`codebook:path=F,threshold=T` / `keep_ratio=R`).

At the projector output each visual token gets a redundancy score, by default its largest cosine similarity
to the codebook's prototypes; threshold mode keeps the tokens scoring below T, keep-ratio mode the round(L·R)
lowest-scoring ones. The kept tokens are compacted before they reach the language model: the dropped
placeholders are removed from the prompt, rows are re-padded on the left, and positions are contiguous
(0..len−1 over the shorter prompt) as in the reference, or the original ones with `positions=original`.

LLaVA-NeXT: base view and tiles are flattened into one list (L = all grid tokens of the image) and the
per-row `image_newline` tokens are replaced by a single one at the end (the reference's `_flatten` mode). The
features are the stock packed ones, so the padding areas of the tiles are already unpadded away and the order
is the packed one (base raster, then the tile grid row-major) rather than crop by crop. A row from which
nothing is dropped is left exactly as the stock model sees it, so a threshold above 1 is the baseline.

`run.image_tokens` (and `GenerationResult.image_tokens`) count the image tokens actually fed, the closing
newline included. The intervention composes with methods that act on the attention plan or the logits; a method
that re-encodes the image into the prompt itself (a second vision pass over `batch.model_inputs`) would meet
the compacted prompt and is not supported after it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vlmscope.codebook.features import check_family, image_features, span_layout
from vlmscope.codebook.io import Codebook, load_codebook
from vlmscope.codebook.selection import keep_mask, redundancy_scores
from vlmscope.decoding.session import GenerationRun, Intervention, InterventionState
from vlmscope.errors import InputError
from vlmscope.interventions.base import INTERVENTIONS
from vlmscope.models.adapters import Batch


@INTERVENTIONS.register("codebook")
@dataclass(frozen=True)
class CodebookPruning(Intervention):
    """Drop visual tokens similar to a redundancy codebook's prototypes, before the language model."""

    path: str = ""
    threshold: float | None = None
    keep_ratio: float | None = None
    score: Literal["max_cosine", "double_softmax", "single_softmax"] = "max_cosine"
    positions: Literal["contiguous", "original"] = "contiguous"

    repeatable = False
    # Both re-read the image from `batch.model_inputs`, which no longer matches the compacted prompt.
    conflicts_with = ("vcd", "aai")

    def __post_init__(self) -> None:
        if not self.path:
            raise InputError("codebook needs path=FILE (a torch-saved [prototypes, width] tensor)")
        if (self.threshold is None) == (self.keep_ratio is None):
            raise InputError("codebook needs exactly one of threshold=T or keep_ratio=R")
        if self.keep_ratio is not None and not 0.0 <= self.keep_ratio <= 1.0:
            raise InputError(f"codebook keep_ratio={self.keep_ratio} must be within [0, 1]")
        if self.score != "max_cosine" and self.keep_ratio is None:
            raise InputError(f"codebook score={self.score} ranks tokens: use keep_ratio=R, not threshold")

    @functools.cached_property
    def codebook(self) -> Codebook:
        # The file's prototypes, read once per spec (a function of `path`, not of any run).
        return load_codebook(self.path)

    def conflict(self, other: Intervention, adapter: Any) -> str | None:
        if other.name == "aai" and other.reference != "vision":  # type: ignore[attr-defined]
            return None  # uniform weights need no second vision pass
        return (f"codebook pruning and {other.name} cannot run together: {other.name} re-reads the image, which no "
                "longer matches the pruned prompt" + (" (aai:reference=uniform works)" if other.name == "aai" else ""))

    def start_run(self, run: GenerationRun) -> _CodebookRun:
        return _CodebookRun(self, run)


class _CodebookRun(InterventionState):
    """The pruning of one run: `keep_masks[row]` is bool [L] over that row's image grid tokens (True = kept)."""

    spec: CodebookPruning

    def __init__(self, spec: CodebookPruning, run: GenerationRun) -> None:
        super().__init__(spec, run)
        self.keep_masks: list[torch.Tensor] = []

    @torch.no_grad()
    def prepare(self, run: GenerationRun) -> None:
        check_family(run.adapter, "codebook pruning")
        if run.inputs_embeds is not None:
            raise InputError("codebook pruning must come before interventions that rewrite the prompt embeddings")
        batch = run.batch
        features = image_features(run.model, batch)
        self.codebook.check_width(features[0].shape[-1])
        prototypes = self.codebook.prototypes.to(features[0].device)
        original_positions = run.adapter.position_ids(batch) if self.positions == "original" else None
        embed = run.model.get_input_embeddings()
        image_id = run.adapter.image_token_id
        pad_id = run.adapter.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else int(pad_id)

        rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.keep_masks = []
        for row in range(batch.batch_size):
            layout = span_layout(run.adapter, batch, row)
            feats = features[row]
            content = torch.as_tensor(layout.content, device=feats.device)
            scores = redundancy_scores(feats[content], prototypes, self.score)
            keep = keep_mask(scores, self.threshold, self.keep_ratio, self.score)
            self.keep_masks.append(keep.cpu())
            if bool(keep.all()):
                span_keep = torch.arange(feats.shape[0], device=feats.device)
            else:
                span_keep = content[keep]
                if len(layout.separators):
                    # One separator (LLaVA-NeXT's image_newline) closes the flattened list.
                    span_keep = torch.cat([span_keep, span_keep.new_tensor([int(layout.separators[-1])])])
            valid = batch.attention_mask[row].bool()
            ids = batch.input_ids[row][valid]
            start = int((ids == image_id).nonzero()[0])
            end = start + feats.shape[0]
            new_ids = torch.cat([ids[:start], ids.new_full((len(span_keep),), image_id), ids[end:]])
            row_embeds = embed(new_ids).clone()
            row_embeds[start:start + len(span_keep)] = feats[span_keep].to(row_embeds.dtype)
            positions = None
            if original_positions is not None:
                pos = original_positions[row][valid]
                positions = torch.cat([pos[:start], pos[start + span_keep], pos[end:]])
            rows.append((new_ids, row_embeds, positions))

        width = max(len(ids) for ids, _, _ in rows)
        device = batch.input_ids.device
        input_ids = torch.full((len(rows), width), pad_id, dtype=batch.input_ids.dtype, device=device)
        attention_mask = torch.zeros((len(rows), width), dtype=batch.attention_mask.dtype, device=device)
        pad_embed = embed(torch.tensor([pad_id], device=device))[0]
        inputs_embeds = pad_embed.expand(len(rows), width, -1).clone()
        position_ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for row, (ids, row_embeds, positions) in enumerate(rows):
            n = len(ids)
            input_ids[row, width - n:] = ids
            attention_mask[row, width - n:] = 1
            inputs_embeds[row, width - n:] = row_embeds
            if positions is not None:
                position_ids[row, width - n:] = positions
        image_mask = (input_ids == image_id) & attention_mask.bool()
        run.replace_batch(Batch(input_ids, attention_mask, batch.model_inputs, image_mask,
                                batch.image_sizes, batch.prompts))
        run.inputs_embeds = inputs_embeds
        run.position_ids = position_ids if original_positions is not None else None
