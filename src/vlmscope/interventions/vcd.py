"""VCD, Visual Contrastive Decoding (Leng et al., CVPR 2024; reference code DAMO-NLP-SG/VCD).

A second branch sees a distorted image: forward diffusion noise at step `noise_step` of a 1000-step schedule
(β_t = sigmoid(linspace(−6, 6, 1000))_t·(5e-3 − 1e-5) + 1e-5, ᾱ_t = Π_{s≤t}(1 − β_s)) applied to the
**normalised** pixel tensor: x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε. ε is drawn per input from a generator seeded with
`noise_seed` (the reference uses the global RNG), so a batch gives the same result as its inputs alone. The
branch has its own KV cache, runs the unmodified model and follows beam reorders.

Per step, on raw logits ℓ (clean) and ℓ' (noised): (1 + α)·ℓ − α·ℓ', set to −inf where ℓ < log β + max ℓ
(adaptive plausibility: keep tokens with p ≥ β·max p). `beta=0` disables the cut-off.

The reference always samples (`do_sample=True`, temperature 1, no top-k/top-p). In vlmscope the sampling is the
decoding method's job: **VCD + `sample` reproduces the reference; VCD + `greedy` is the common greedy variant**
(and `beam` works too). Defaults as the reference evaluation script: α = 1, β = 0.1, noise_step = 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.interventions._common import Branch, BranchContrastState, plausibility_cut
from vlmscope.interventions.base import INTERVENTIONS, Intervention

NUM_DIFFUSION_STEPS = 1000


def diffusion_coefficients(step: int) -> tuple[float, float]:
    """(√ᾱ_t, √(1 − ᾱ_t)) of VCD's 1000-step sigmoid schedule at `step` (0-based)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, NUM_DIFFUSION_STEPS, dtype=torch.float64))
    betas = betas * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)[step]
    return float(alpha_bar.sqrt()), float((1.0 - alpha_bar).sqrt())


def add_diffusion_noise(pixels: torch.Tensor, step: int, seed: int) -> torch.Tensor:
    """Noise one input's normalised pixel tensor; ε comes from a CPU generator seeded with `seed`."""
    keep, noise_scale = diffusion_coefficients(step)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32)
    noised = keep * pixels.float() + noise_scale * eps.to(pixels.device)
    return noised.to(pixels.dtype)


def noised_model_inputs(model_inputs: dict[str, Any], step: int, seed: int,
                        views_per_row: list[int] | None = None) -> dict[str, Any]:
    """A copy of the processor outputs with every input's pixel values noised independently.

    `views_per_row`: for processors that pack every input's tiles in one [tiles, C, H, W] tensor (InternVL),
    how many of them belong to each input, so that each input gets one noise draw, not one per tile."""
    pixels = model_inputs.get("pixel_values")
    if not isinstance(pixels, torch.Tensor):
        raise InputError("vcd: the batch has no pixel_values to distort")
    grid = model_inputs.get("image_grid_thw")
    if views_per_row is not None:
        chunks = pixels.split(views_per_row, dim=0)
        noised = torch.cat([add_diffusion_noise(c, step, seed) for c in chunks], dim=0)
    elif grid is not None:
        # Qwen2-VL packs all images' patches in one [patches, dim] tensor.
        chunks = pixels.split(grid.prod(-1).tolist(), dim=0)
        noised = torch.cat([add_diffusion_noise(c, step, seed) for c in chunks], dim=0)
    else:
        noised = torch.stack([add_diffusion_noise(p, step, seed) for p in pixels], dim=0)
    return {**model_inputs, "pixel_values": noised}


@INTERVENTIONS.register("vcd")
@dataclass(frozen=True)
class VCD(Intervention):
    alpha: float = 1.0
    beta: float = 0.1
    noise_step: int = 500
    noise_seed: int = 0

    # The noised branch's cache cannot follow a rollback of the main cache (OPERA).
    supports_rollback = False
    repeatable = False

    def __post_init__(self) -> None:
        if not 0 <= self.noise_step < NUM_DIFFUSION_STEPS:
            raise ValueError(f"noise_step must be in [0, {NUM_DIFFUSION_STEPS - 1}]")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError("beta must be in [0, 1)")

    def start_run(self, run: GenerationRun) -> _VCDRun:
        return _VCDRun(self, run)


class _VCDRun(BranchContrastState):
    """VCD's per-run state: the noised-image branch."""

    spec: VCD

    def build_branch(self, run: GenerationRun) -> Branch:
        batch = run.batch
        views = getattr(run.adapter, "packed_views_per_row", None)
        inputs = noised_model_inputs(batch.model_inputs, self.noise_step, self.noise_seed,
                                     views(batch) if views is not None else None)
        return Branch(run.model, run.adapter, batch.input_ids, batch.attention_mask, inputs)

    def contrast(self, logits: torch.Tensor, noised: torch.Tensor, run: GenerationRun) -> torch.Tensor:
        return plausibility_cut(logits, (1.0 + self.alpha) * logits - self.alpha * noised, self.beta)
