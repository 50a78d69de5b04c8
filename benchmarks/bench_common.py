"""Shared pieces of the benchmark scripts: LLaVA-1.5-7B shapes, the random-model builder, and GPU-aware timing
and peak-memory measurement.

Peak memory: on CUDA the allocator's peak (`max_memory_allocated`, reset before the block) minus what was
allocated before it, so the weights are not counted; on the CPU the process's peak resident set (VmHWM, reset
before the block; a sampling thread where the kernel does not allow the reset) minus the resident set before.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

# LLaVA-1.5-7B: the Vicuna-7B language model (Llama-2 shapes, LLaVA's 32064-token vocabulary) and the
# CLIP ViT-L/14 vision tower at 336 px (patch 14: 576 image tokens).
LLAVA15_7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
LLAVA15_7B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
LLAVA15_IMAGE_SIZE = 336
LLAVA15_PATCH_SIZE = 14


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_llava_vlm(text: dict[str, Any] | None = None, vision: dict[str, Any] | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, scale: float = 8.0,
                    image_size: int = LLAVA15_IMAGE_SIZE, patch_size: int = LLAVA15_PATCH_SIZE, seed: int = 0,
                    fixed_length: bool = False) -> Any:
    """A random-init LLaVA (`vlmscope.models.tiny.build_llava` with these shapes) as a `VLM`.

    The weights are created on `device` in `dtype` directly: a 7B model never passes through host memory in
    float32 (28 GB) and takes seconds to build on a GPU. `fixed_length`: no EOS token, so every decoding path
    (ours and stock `generate` alike) runs to its max_new_tokens and runs of different methods are comparable.
    """
    from vlmscope.api import VLM
    from vlmscope.models.tiny import build_llava

    with default_dtype(dtype), torch.device(device):
        model, processor = build_llava(seed=seed, image_size=image_size, patch_size=patch_size, scale=scale,
                                       text=text, vision=vision)
    model = model.to(device=device, dtype=dtype).eval()
    if fixed_length:
        # An empty list (not None, which falls back to the tokenizer's EOS) means: no token ends a sequence.
        model.generation_config.eos_token_id = []
    return VLM(model, processor, "bench-llava")


def random_image(seed: int = 0, width: int = LLAVA15_IMAGE_SIZE, height: int = LLAVA15_IMAGE_SIZE) -> Image.Image:
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- memory -------------------------------------------------------------------------------------------------

def _rss_kib() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak, or the CPU resident set's high-water mark."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so the resident set is honest
        except OSError:
            pass
        self.base = _rss_kib()
        self._hwm_reset = _reset_hwm()
        self._sampled = self.base
        self._stop = threading.Event()
        if not self._hwm_reset:  # fall back to sampling the resident set
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _rss_kib())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
            return
        if self._hwm_reset:
            peak = _hwm_kib()
        else:
            self._stop.set()
            self._thread.join()
            peak = self._sampled
        self.peak_bytes = max(0, peak - self.base) * 1024


def map_large_blocks() -> None:
    """Make glibc serve every block >= 128 KiB by mmap and give it back on free (no dynamic threshold), so the
    resident set follows live tensors and one search's freed memory does not hide the next one's peak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _hwm_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# --- timing -------------------------------------------------------------------------------------------------

def measure(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, int, Any]:
    """Run `fn` once: (wall seconds with the GPU synchronised on both ends, peak extra bytes, its result)."""
    with PeakMemory(device) as memory:
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        elapsed = time.perf_counter() - start
    return elapsed, memory.peak_bytes, result


def median(values: list[float]) -> float:
    return float(statistics.median(values))
