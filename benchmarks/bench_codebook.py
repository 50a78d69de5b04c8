"""Codebook pruning: prefill time and KV-cache size against the keep ratio, side by side in one run.

A LLaVA-1.5-shaped tiny model (336 px, patch 14: 576 image tokens) with random weights and a random codebook
of the projector's width. For every keep ratio (1.0 = nothing dropped, then 0.5, 0.25, 0.1) and for the stock
path without the intervention, the time of scoring + compaction + prefill (median of --repeats, rounds
interleaved) and the size of the KV cache after the prefill. Ratios are against the stock prefill.

    python benchmarks/bench_codebook.py                      # CPU, small text model (about a minute)
    python benchmarks/bench_codebook.py --device cuda --full # LLaVA-1.5-7B shapes, random weights, fp16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmscope.api import VLM
from vlmscope.decoding.session import GenerationRun
from vlmscope.interventions.codebook import CodebookPruning
from vlmscope.models.tiny import build_llava

KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)


def build_model(full: bool, device: str) -> VLM:
    if full:
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        dtype = torch.float16
    else:
        text = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=8)
        vision = None
        dtype = torch.float32
    # Build directly on the device in the target dtype (7B in fp32 on the CPU would need 28 GB).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model, processor = build_llava(image_size=336, patch_size=14, scale=1.0, text=text, vision=vision)
    finally:
        torch.set_default_dtype(previous)
    return VLM(model.eval(), processor, "bench-llava-576")


def kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prefill(vlm: VLM, batch, interventions, device: str) -> tuple[float, int, int]:
    sync(device)
    start = time.perf_counter()
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, interventions) as run:
        run.prefill()
        sync(device)
        elapsed = time.perf_counter() - start
        return elapsed, kv_bytes(run.cache), int(run.image_tokens[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shapes (needs a GPU)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prototypes", type=int, default=454, help="codebook size (the shipped LLaVA-1.5 one: 454)")
    args = parser.parse_args()
    torch.manual_seed(0)
    vlm = build_model(args.full, args.device)
    width = vlm.model.get_input_embeddings().weight.shape[1]
    image = Image.fromarray((np.random.RandomState(0).rand(336, 448, 3) * 255).astype("uint8"))
    batch = vlm.encode([image], ["describe this image in detail ."])

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random_codebook.pt"
        torch.save(torch.randn(args.prototypes, width).half(), path)
        configs: list[tuple[str, list]] = [("stock (no intervention)", [])]
        configs += [(f"codebook keep_ratio={r}", [CodebookPruning(path=str(path), keep_ratio=r)])
                    for r in KEEP_RATIOS]
        times: dict[str, list[float]] = {name: [] for name, _ in configs}
        sizes: dict[str, tuple[int, int]] = {}
        for _, interventions in configs:  # warm-up (allocator, lazily installed hooks)
            prefill(vlm, batch, interventions, args.device)
        for _ in range(args.repeats):  # interleaved rounds: drift in machine load hits every config alike
            for name, interventions in configs:
                elapsed, kv, image_tokens = prefill(vlm, batch, interventions, args.device)
                times[name].append(elapsed)
                sizes[name] = (kv, image_tokens)

    base_time = statistics.median(times[configs[0][0]])
    base_kv = sizes[configs[0][0]][0]
    print(f"model: {'LLaVA-1.5-7B shapes' if args.full else 'small LLaVA'} (hidden {width}), "
          f"{int(batch.image_mask.sum())} image tokens, prompt {batch.input_ids.shape[1]} tokens, "
          f"codebook {args.prototypes}x{width}, device {args.device}, median of {args.repeats}")
    print(f"{'config':28s} {'image tok':>9s} {'prefill ms':>11s} {'time ratio':>10s} {'KV MiB':>8s} {'KV ratio':>8s}")
    for name, _ in configs:
        median = statistics.median(times[name])
        kv, image_tokens = sizes[name]
        print(f"{name:28s} {image_tokens:9d} {median * 1e3:11.1f} {median / base_time:10.2f} "
              f"{kv / 2**20:8.2f} {kv / base_kv:8.2f}")


if __name__ == "__main__":
    main()
