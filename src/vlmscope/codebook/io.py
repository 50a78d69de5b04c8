"""Codebook files: a `torch.save`d [N, D] tensor (the published format) plus an optional JSON sidecar.

The published codebooks are bare float16 tensors saved on `cuda:0` with a `.json` list of source image ids
next to them; ours are the same tensor (saved on the CPU) with a sidecar that names each prototype's source
image and position and the construction settings. Both load with `load_codebook`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmscope.errors import InputError

FORMAT = "vlmscope.codebook/1"


@dataclass
class Codebook:
    """Prototypes [N, D] (post-projector token embeddings) and what the sidecar says about them."""

    prototypes: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def size(self) -> int:
        return int(self.prototypes.shape[0])

    @property
    def width(self) -> int:
        return int(self.prototypes.shape[1])

    def check_width(self, width: int) -> None:
        if self.width != width:
            raise InputError(
                f"codebook {self.path or '(in memory)'} has width {self.width} but the model's projector outputs "
                f"width {width}: use a codebook built for this model (vlmscope codebook build)"
            )


def sidecar_path(path: str | Path) -> Path:
    """`cb.pt` → `cb.json` (the published layout); a name without suffix gets `.json` appended."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix else path.with_name(path.name + ".json")


def load_codebook(path: str | Path) -> Codebook:
    """Load a codebook tensor (any device, any float dtype) and its sidecar if there is one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"codebook file not found: {path}")
    try:
        # weights_only: a codebook is data; never unpickle arbitrary objects from a downloaded file.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise InputError(f"cannot read codebook {path}: not a torch-saved tensor ({exc.__class__.__name__})") from None
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        obj = tensors[0] if len(tensors) == 1 else obj
    if not isinstance(obj, torch.Tensor) or obj.dim() != 2 or not obj.is_floating_point():
        what = f"a tensor of shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise InputError(f"codebook {path} holds {what}: expected a float tensor of shape [prototypes, width]")
    if obj.shape[0] == 0:
        raise InputError(f"codebook {path} is empty (0 prototypes)")
    meta: dict[str, Any] = {}
    side = sidecar_path(path)
    if side.is_file():
        try:
            loaded = json.loads(side.read_text())
        except (OSError, ValueError):
            loaded = None
        # The published sidecar is a bare list of source image ids; ours is an object.
        meta = loaded if isinstance(loaded, dict) else {"sources": loaded} if loaded is not None else {}
    return Codebook(obj, meta, str(path))


def save_codebook(path: str | Path, prototypes: torch.Tensor, meta: dict[str, Any]) -> Path:
    """Write the float16 tensor (published format) and the JSON sidecar; returns the tensor's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensor = prototypes.detach().to("cpu", torch.float16).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(tensor, tmp)
    tmp.replace(path)
    sidecar = {"format": FORMAT, "shape": list(tensor.shape), "dtype": "float16", **meta}
    sidecar_path(path).write_text(json.dumps(sidecar, indent=1) + "\n")
    return path
