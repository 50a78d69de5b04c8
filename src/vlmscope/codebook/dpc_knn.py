"""Density-peak clustering with k nearest neighbours (DPC-KNN), the TCFormer / Chat-UniVi variant.

d_ij = ‖x_i − x_j‖ / √C; density ρ_i = exp(−mean of d² over the k nearest neighbours (self included)) plus a
seeded ×1e-6 tie-breaker; δ_i = distance to the nearest denser point (for the densest point its largest
distance); the `cluster_num` points with the largest ρ·δ are the centres; every point joins its nearest centre.
"""

from __future__ import annotations

import torch


def dpc_knn(x: torch.Tensor, cluster_num: int, k: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of x [N, C]. Returns (labels [N] in 0..cluster_num-1, centre indices [cluster_num]).

    cluster_num and k are clamped to N, so a small input still clusters.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError("dpc_knn needs a non-empty [N, C] matrix")
    n, c = x.shape
    x = x.float()
    cluster_num = max(1, min(cluster_num, n))
    k = max(1, min(k, n))
    dist = torch.cdist(x[None], x[None])[0] / c**0.5
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(n, generator=generator).to(x.device) * 1e-6
    density = (-(nearest**2).mean(dim=-1)).exp() + noise
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    row_max = dist.max(dim=-1).values
    masked = torch.where(denser, dist, torch.full_like(dist, float("inf")))
    delta = masked.min(dim=-1).values
    delta = torch.where(denser.any(dim=-1), delta, row_max)
    centres = torch.topk(delta * density, cluster_num).indices
    labels = dist[:, centres].argmin(dim=-1)
    labels[centres] = torch.arange(cluster_num, device=x.device)
    return labels, centres
