"""Cost of the decoding-time interventions against plain greedy decoding, measured side by side in one run.

Default: a small random LLaVA with LLaVA-1.5's 576 image tokens (336 px, patch 14) and an 8-layer, 256-wide
language model on the CPU. Every method decodes the same number of tokens (EOS disabled), methods are
interleaved within each repeat, and the fastest repeat is reported (on a shared CPU, noise only adds time):

- PAI and AAI time ratio over greedy (goal <= 1.15x), AAI with its warm-up and without;
- FastV (k=2, ratio=0.5): prefill speed-up and KV-cache saving (drop mode; mask mode for reference);
- VCD and PAI-CFG cost ratios (each adds a second branch, so about 2x is expected);
- information-flow truncation for completeness;
- ICD, M3ID, SID (a second branch each), DoLa, DeCo, VISTA and VAF (issue 18).

    python benchmarks/bench_interventions.py                  # CPU, ~1 minute
    python benchmarks/bench_interventions.py --device cuda --full --dtype float16   # LLaVA-1.5-7B shapes
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_common import (  # a sibling module in benchmarks/
    LLAVA15_7B_TEXT,
    LLAVA15_7B_VISION,
    build_llava_vlm,
    sync,
)
from PIL import Image

from vlmscope.api import VLM
from vlmscope.decoding.greedy import Greedy
from vlmscope.decoding.session import GenerationRun
from vlmscope.interventions import INTERVENTIONS

METHODS = [
    ("greedy", None),
    ("pai", "pai"),
    ("aai (warm-up)", "aai"),
    ("aai (no warm-up)", "aai:warmup=false"),
    ("truncate L=4", "truncate:layer=4"),
    ("fastv drop", "fastv:k=2,ratio=0.5"),
    ("fastv mask", "fastv:k=2,ratio=0.5,mode=mask"),
    ("vcd", "vcd"),
    ("pai cfg", "pai:cfg=true,gamma=1.1"),
    # issue 18: two-branch contrasts (about 2x expected), DoLa's early-exit projections, VAF's eager layers
    ("icd", "icd"),
    ("m3id", "m3id"),
    ("dola", "dola"),
    ("deco", "deco"),
    ("vista", "vista"),
    ("vaf", "vaf"),
    ("sid", "sid"),
]
# The small model has 8 decoder layers: VAF's layers 9..14 of 32 become 2..3 (the same place in the stack),
# DeCo's hidden states 20..28 of 32 become 5..7, VISTA's SLA window 25..30 becomes 6.
SMALL_MODEL_SPECS = {"vaf": "vaf:start=2,end=4", "deco": "deco:start=5,end=8",
                     "vista": "vista:sla_start=6,sla_end=8,steer_end=8"}


def build(args: argparse.Namespace) -> VLM:
    if args.full:
        text, vision = LLAVA15_7B_TEXT, LLAVA15_7B_VISION
        scale = 1.0  # random 7B-sized weights need no sharpening to vary
    else:
        text = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8)
        vision = None
        scale = 8.0
    return build_llava_vlm(text, vision, device=args.device, dtype=getattr(torch, args.dtype), scale=scale)


def measure(vlm: VLM, batch, spec: str | None, tokens: int, device: str) -> dict[str, float]:
    """One generation of exactly `tokens` tokens: total seconds (setup such as AAI's vision pass + prefill +
    decode), prefill seconds, the mean decode-step seconds (after the prefill, incl. the interventions' logit
    processing and branches) and the KV-cache size in MiB at the end."""
    interventions = [INTERVENTIONS.parse(spec)] if spec else []
    greedy = Greedy()
    pad = vlm.adapter.tokenizer.pad_token_id
    timings: dict[str, float] = {}

    class Timed(GenerationRun):
        def prefill(self) -> torch.Tensor:
            sync(device)
            start = time.perf_counter()
            logits = super().prefill()
            sync(device)
            timings["prefill_end"] = time.perf_counter()
            timings["prefill"] = timings["prefill_end"] - start
            return logits

    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        with Timed(vlm.model, vlm.adapter, batch, interventions) as run:
            hyps = greedy.decode(run, tokens, eos_ids=[], pad_id=pad)
            sync(device)
            end = time.perf_counter()
            timings["total"] = end - start
            timings["decode"] = (end - timings.pop("prefill_end")) / max(1, tokens - 1)
            cache = run.cache
            timings["kv_mib"] = sum(layer.keys.numel() * layer.keys.element_size() * 2
                                    for layer in cache.layers) / 2**20
    assert len(hyps[0].token_ids) == tokens
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shapes (use a GPU)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier timings on a shared CPU; 0 leaves torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    vlm = build(args)
    if not args.full:
        METHODS[:] = [(name, SMALL_MODEL_SPECS.get(name, spec)) for name, spec in METHODS]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (400, 500, 3), dtype=np.uint8))
    batch = vlm.encode([image], ["describe this image in detail ."])
    print(f"model: {vlm.adapter.num_layers} decoder layers, hidden {vlm.adapter.text_config.hidden_size}, "
          f"{int(batch.image_mask.sum())} image tokens, prompt {batch.input_ids.shape[1]} tokens, "
          f"{args.tokens} new tokens, {args.device} {args.dtype}, best of {args.repeats} interleaved repeats")

    for _, spec in METHODS:  # warm-up (allocator, lazy imports)
        measure(vlm, batch, spec, 2, args.device)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name, _ in METHODS}
    for _ in range(args.repeats):
        for name, spec in METHODS:
            samples[name].append(measure(vlm, batch, spec, args.tokens, args.device))

    def med(name: str, key: str) -> float:
        return min(s[key] for s in samples[name])

    base_total, base_prefill, base_kv = med("greedy", "total"), med("greedy", "prefill"), med("greedy", "kv_mib")
    base_decode = med("greedy", "decode")
    print(f"\n{'method':<18} {'total s':>8} {'ratio':>7} {'prefill s':>10} {'speed-up':>9} {'step ms':>8} "
          f"{'ratio':>7} {'KV MiB':>7} {'KV saved':>9}")
    for name, _ in METHODS:
        total, prefill, kv = med(name, "total"), med(name, "prefill"), med(name, "kv_mib")
        step = med(name, "decode")
        print(f"{name:<18} {total:>8.3f} {total / base_total:>6.2f}x {prefill:>10.4f} "
              f"{base_prefill / prefill:>8.2f}x {step * 1e3:>8.2f} {step / base_decode:>6.2f}x {kv:>7.2f} "
              f"{1 - kv / base_kv:>8.1%}")
    goal = max(med("pai", "total"), med("aai (no warm-up)", "total")) / base_total
    print(f"\nPAI/AAI worst ratio {goal:.2f}x (goal <= 1.15x): {'met' if goal <= 1.15 else 'MISSED'}")


if __name__ == "__main__":
    main()
