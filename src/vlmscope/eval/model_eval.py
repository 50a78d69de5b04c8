"""The model side of the evaluation runners: callables that caption / answer, accelerate sharding.

The runners themselves (`vlmscope.eval.runner`) only see callables, so metrics and resumption are tested
without a model; this module turns a `VLM` plus a decoding method and interventions into those callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vlmscope.eval.config import EvalConfig, load_config

__all__ = ["EvalConfig", "Shard", "answer_fn", "caption_fn", "current_shard", "load_config", "resolve_method"]


def resolve_method(spec: Any, defaults: dict[str, Any], registry: Any) -> Any:
    """A bare method name picks up its default parameters from the config's `methods` section."""
    if isinstance(spec, str) and ":" not in spec and spec in defaults:
        return registry.from_config({"name": spec, **defaults[spec]})
    return registry.from_config(spec)


def caption_fn(vlm: Any, prompt: str, max_new_tokens: int, decoding: Any, interventions: Sequence[Any]
               ) -> Callable[[list[str]], list[str]]:
    method = vlm.resolve_decoding(decoding)
    steering = vlm.resolve_interventions(list(interventions))

    def run(image_paths: list[str]) -> list[str]:
        batch = vlm.encode(list(image_paths), [prompt] * len(image_paths))
        return [r.text for r in vlm.generate_batch(batch, max_new_tokens, method, steering)]

    return run


def answer_fn(vlm: Any, suffix: str, max_new_tokens: int, decoding: Any, interventions: Sequence[Any]
              ) -> Callable[[list[tuple[str, str]]], list[str]]:
    method = vlm.resolve_decoding(decoding)
    steering = vlm.resolve_interventions(list(interventions))

    def run(items: list[tuple[str, str]]) -> list[str]:
        images = [path for path, _ in items]
        prompts = [f"{question}{suffix}" for _, question in items]
        batch = vlm.encode(images, prompts)
        return [r.text for r in vlm.generate_batch(batch, max_new_tokens, method, steering)]

    return run


@dataclass
class Shard:
    """This process's place under `accelerate launch` (rank 0 of 1 otherwise)."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None
    _state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self._state is not None and self.world_size > 1:
            self._state.wait_for_everyone()


def current_shard() -> Shard:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return Shard()
    from accelerate import PartialState

    state = PartialState()
    return Shard(state.process_index, state.num_processes, str(state.device), state)
