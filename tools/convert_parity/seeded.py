"""Seeded random weights by tensor name (pure torch): both sides of a conversion parity check rebuild them.

The fixtures under tests/data/convert store only tensor names and shapes, the inputs and the original code's
outputs; the weights themselves are regenerated from the names (CPU generator seeded by the name's CRC32, the
same torch version on both sides), so a 1024-wide CLIP costs nothing to store.
"""

from __future__ import annotations

import zlib

import torch


def seeded_tensor(name: str, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1:
        # Norm scales near 1, biases near 0: varied but well-conditioned activations.
        return 1.0 + 0.1 * noise if leaf == "weight" and "norm" in name.lower() else 0.1 * noise
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    return noise * (2.0 / fan_in ** 0.5)


def seeded_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {name: seeded_tensor(name, shape) for name, shape in sorted(shapes.items())}
