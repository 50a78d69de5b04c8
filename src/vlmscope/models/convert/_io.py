"""Reading original checkpoints: config.json and weights (safetensors or PyTorch .bin, sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlmscope.errors import InputError


def read_config(folder: Path, what: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{what} {folder} has no config.json: point to the checkpoint folder")
    return json.loads(path.read_text())


def read_state_dict(folder: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `folder` (all shards), on the CPU."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise InputError(f"{what} {folder} has no weights (*.safetensors or pytorch_model*.bin)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state
