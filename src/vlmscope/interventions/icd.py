"""ICD, Instruction Contrastive Decoding (Wang, Pan, Ding, Biemann; Findings of ACL 2024; code p1k0pan/ICD).

A second branch sees the same image and question under a *disturbance instruction* ("You are a confused objects
detector ..."), which makes the model hallucinate more; its logits ℓ' are contrasted away as in VCD: on raw
logits, (1 + α)·ℓ − α·ℓ', set to −inf where ℓ < log β + max ℓ. The branch has its own KV cache, runs the
unmodified model, is fed the main run's tokens and follows beam reorders.

Where the disturbance goes (`placement`):
- `system` (the reference's LLaVA path): the disturbance is the chat template's system message. The reference
  *replaces* LLaVA-v1's system message; llava-hf templates have no default system message, so here it is added.
  How it is rendered is the model's chat template's choice.
- `after_image` (SID's ICD baseline): the disturbance is inserted right after the image, before the question.

The disturbed prompt is rebuilt from the rendered text: the image placeholder is tokenised once and repeated as
many times as the processor expanded it in the batch. The rebuild of the *normal* prompt is checked against the
batch's tokens, so a processor that expands prompts differently is refused instead of contrasted silently.

Defaults as the reference scripts: α = 1, β = 0.1; disturbance `confused` (the reference loops over five
strings and sets no default; the authors report that all of them raise hallucination). The reference samples
(T = 1, top_p = 1): ICD + `sample` reproduces it, ICD + `greedy`/`beam` are the usual variants.
See docs/methods/icd.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions._common import Branch, BranchContrastState, plausibility_cut
from vlmscope.interventions.base import INTERVENTIONS, Intervention
from vlmscope.models.adapters import Adapter

# The reference scripts' five disturbance instructions (experiments/gen_scripts), plus SID's two ICD prefixes.
DISTURBANCES = {
    "detector": "You are an object detector to recognize every different objects.",
    "detector_shapes": "You are an object detector to recognize every different objects by focusing the shapes, "
                       "colors and relationships of objects.",
    "avoid": "I want you avoid any specific identification or categorization of the objects depicted.",
    "confused": "You are a confused objects detector to provide a fuzzy overview or impression of the image.",
    "general": "You are an object detector to provide a general overview or impression of the image.",
    "sid_pope": "You are a confused object detector.",
    "sid_chair": "You are a confused image caption model.",
}


def contrast_scores(logits: torch.Tensor, disturbed: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """(1 + α)·ℓ − α·ℓ' on raw logits, −inf where ℓ < log β + max ℓ (VCD's contrast, ICD's reference)."""
    return plausibility_cut(logits, (1.0 + alpha) * logits - alpha * disturbed, beta)


def disturbance_text(name_or_text: str) -> str:
    """A preset's text (`DISTURBANCES`), or the given text itself."""
    return DISTURBANCES.get(name_or_text, name_or_text)


def render_disturbed(adapter: Adapter, prompt: str, disturbance: str, placement: str) -> str:
    """The chat-template text of one prompt with the disturbance instruction placed."""
    if placement == "after_image":
        return adapter.render_prompt(f"{disturbance} {prompt}")
    if getattr(adapter.processor, "chat_template", None) is None:
        raise InputError("icd: the processor has no chat template to place a system message in")
    messages = [{"role": "system", "content": [{"type": "text", "text": disturbance}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return adapter.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _expand_image_token(adapter: Adapter, text: str, image_tokens: int) -> list[int]:
    ids = adapter.tokenizer(text)["input_ids"]
    image_id = adapter.image_token_id
    if ids.count(image_id) != 1:
        raise InputError("icd: the rendered prompt must hold exactly one image placeholder")
    at = ids.index(image_id)
    return ids[:at] + [image_id] * image_tokens + ids[at + 1:]


def disturbed_inputs(adapter: Adapter, batch: Any, disturbance: str, placement: str
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Left-padded input ids, attention mask and model inputs of the disturbed prompts of `batch`."""
    pad = adapter.pad_token_id()
    rows = []
    for row, prompt in enumerate(batch.prompts):
        count = int(batch.image_mask[row].sum())
        normal = _expand_image_token(adapter, adapter.render_prompt(prompt), count)
        given = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        if normal != given:
            raise InputError("icd: cannot rebuild this processor's prompt from its chat template "
                             "(the tokens differ); ICD supports processors that expand one image placeholder")
        rows.append(_expand_image_token(adapter, render_disturbed(adapter, prompt, disturbance, placement), count))
    width = max(len(r) for r in rows)
    device = batch.input_ids.device
    ids = torch.full((len(rows), width), pad, dtype=batch.input_ids.dtype, device=device)
    mask = torch.zeros((len(rows), width), dtype=batch.attention_mask.dtype, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=ids.dtype)
        mask[i, width - len(r):] = 1
    inputs = dict(batch.model_inputs)
    if "mm_token_type_ids" in inputs:
        # Qwen2-VL marks image positions per token: recompute them for the longer prompt.
        old = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = (ids == adapter.image_token_id).to(old.dtype)
    return ids, mask, inputs


@INTERVENTIONS.register("icd")
@dataclass(frozen=True)
class ICD(Intervention):
    alpha: float = 1.0
    beta: float = 0.1
    disturbance: str = "confused"
    placement: Literal["system", "after_image"] = "system"

    # The disturbed branch's cache cannot follow a rollback of the main cache (OPERA).
    supports_rollback = False
    repeatable = False
    conflicts_with: ClassVar[tuple[str, ...]] = ("vcd", "m3id")

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ValueError("beta must be in [0, 1)")
        if not disturbance_text(self.disturbance).strip():
            raise ValueError("disturbance must be a preset name or a non-empty instruction")

    def conflict(self, other: Intervention, adapter: Adapter) -> str | None:
        return (f"icd and {other.name} each replace the next-token scores by a contrast with a second branch: "
                "use one of them")

    def start_run(self, run: GenerationRun) -> _ICDRun:
        return _ICDRun(self, run)


class _ICDRun(BranchContrastState):
    """ICD's per-run state: the disturbed-instruction branch."""

    spec: ICD

    def prepare(self, run: GenerationRun) -> None:
        # Refuse an unsupported processor before anything runs (the branch itself is built after expansion).
        disturbed_inputs(run.adapter, run.batch, disturbance_text(self.disturbance), self.placement)

    def build_branch(self, run: GenerationRun) -> Branch:
        ids, mask, inputs = disturbed_inputs(run.adapter, run.batch, disturbance_text(self.disturbance),
                                             self.placement)
        return Branch(run.model, run.adapter, ids, mask, inputs)

    def contrast(self, logits: torch.Tensor, branch_logits: torch.Tensor, run: GenerationRun) -> torch.Tensor:
        return contrast_scores(logits, branch_logits, self.alpha, self.beta)
