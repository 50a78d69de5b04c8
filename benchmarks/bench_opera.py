"""OPERA vs stock transformers beam search: time and peak memory side by side in one run.

Default: a small random LLaVA with LLaVA-1.5's 576 image tokens on the CPU, 5 beams, 64 and 256 new tokens
(EOS disabled so every search runs to the length limit). Three searches per length, interleaved and repeated:
stock `model.generate(num_beams=5)`, OPERA with rollback off (threshold >= max_new_tokens) and OPERA with the
reference defaults; optionally (`--searches`) OPERA with scale_factor 500, which makes this random model roll
back often and shows what rollbacks cost. Goals: <= 1.5x stock time with rollback off, <= 2.5x with defaults.

    PYTHONPATH=src python benchmarks/bench_opera.py                 # ~1-2 minutes on a small CPU
    PYTHONPATH=src python benchmarks/bench_opera.py --device cuda --full   # LLaVA-1.5-7B shapes, random weights

Peak memory: on CUDA the allocator's peak; on the CPU, in a separate pass after the timings, the process's peak
resident set (VmHWM, reset before each search, with glibc mapping every large block separately so that freed
memory really leaves) minus the resident set before the search.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

import numpy as np
import torch
from bench_common import (  # a sibling module in benchmarks/
    LLAVA15_7B_TEXT,
    LLAVA15_7B_VISION,
    build_llava_vlm,
    map_large_blocks,
    measure,
)
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- model ----------------------------------------------------------------------------------------------------

def build(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.full:  # LLaVA-1.5-7B shapes (random weights)
        text, vision, scale = LLAVA15_7B_TEXT, LLAVA15_7B_VISION, 1.0
    else:
        text = dict(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=8, num_key_value_heads=4)
        vision = None
        scale = 4.0
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    vlm = build_llava_vlm(text, vision, device=args.device, dtype=dtype, scale=scale)
    vlm.model.generation_config.eos_token_id = None  # every search runs to max_new_tokens
    return vlm.model, vlm


def run_stock(vlm: Any, batch: Any, beams: int, max_new: int) -> dict[str, Any]:
    out = vlm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs,
                             num_beams=beams, do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new)
    return {"tokens": out.shape[1] - batch.input_ids.shape[1], "rollbacks": 0, "steps": max_new}


def run_opera(vlm: Any, batch: Any, beams: int, max_new: int, **params: Any) -> dict[str, Any]:
    from vlmscope.decoding.opera import OperaDecoding
    from vlmscope.decoding.session import GenerationRun

    method = OperaDecoding(num_beams=beams, **params)
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, []) as run:
        hyp = method.decode(run, max_new, [], vlm.adapter.tokenizer.pad_token_id)[0]
    info = hyp.extras["opera"]
    return {"tokens": len(hyp.token_ids), "rollbacks": info["rollbacks"], "steps": info["decoding_steps"]}


SEARCHES = {
    "stock beam": {},
    "OPERA, rollback off": {"threshold": None},  # None: set to max_new_tokens
    "OPERA, defaults": {},
    "OPERA, many rollbacks": {"scale_factor": 500.0},  # sigma 500: aggregation columns cross the float16 range
}


def run_search(vlm: Any, batch: Any, name: str, beams: int, max_new: int) -> dict[str, Any]:
    if name == "stock beam":
        return run_stock(vlm, batch, beams, max_new)
    params = dict(SEARCHES[name])
    if params.get("threshold", 0) is None:
        params["threshold"] = max_new
    return run_opera(vlm, batch, beams, max_new, **params)


def encode(vlm: Any) -> Any:
    image = Image.fromarray((np.random.RandomState(0).rand(336, 336, 3) * 255).astype("uint8"))
    return vlm.encode([image], ["describe this image in detail ."])


def prepare(args: argparse.Namespace) -> Any:
    """Build the model, warm every search up, and return `run(name, max_new) -> {seconds, peak, steps, ...}`."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _, vlm = build(args)
    batch = encode(vlm)
    with torch.no_grad():
        for name in args.searches:
            run_search(vlm, batch, name, args.beams, 4)

    def run(name: str, max_new: int) -> dict[str, Any]:
        with torch.no_grad():
            seconds, peak, info = measure(lambda: run_search(vlm, batch, name, args.beams, max_new), device)
        return {"seconds": seconds, "peak": peak, **info}

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shapes (needs a large GPU)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the median is shown")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable on a shared machine)")
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES)[:3], choices=list(SEARCHES),
                        metavar="NAME", help=f"from {list(SEARCHES)}; 'OPERA, many rollbacks' (sigma 500) is slow: "
                                             "at 256 tokens it redoes ~4x as many steps")
    args = parser.parse_args()
    if "stock beam" not in args.searches:
        args.searches.insert(0, "stock beam")
    run = prepare(args)
    shape = "LLaVA-1.5-7B shapes" if args.full else f"small LLaVA (hidden {args.hidden}, {args.layers} layers)"
    print(f"model: {shape}, 576 image tokens, {args.beams} beams, device {args.device}, {args.threads} thread(s), "
          f"time: median of {args.repeats}")

    timings: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for max_new in args.lengths:
        for _ in range(args.repeats):  # interleaved, so that load changes hit every search alike
            for name in args.searches:
                timings.setdefault((max_new, name), []).append(run(name, max_new))
    peaks = {key: runs[-1]["peak"] for key, runs in timings.items()}
    if args.device == "cpu":
        # A separate pass for memory: with every large block mapped separately the resident set follows the
        # live tensors exactly, but the extra system calls would distort the timings above.
        map_large_blocks()
        peaks = {}
        for _ in range(2):  # the smaller of two: allocator noise only ever adds
            for max_new in args.lengths:
                for name in args.searches:
                    peak = run(name, max_new)["peak"]
                    peaks[(max_new, name)] = min(peak, peaks.get((max_new, name), peak))

    rows = []
    for max_new in args.lengths:
        base_time = statistics.median(r["seconds"] for r in timings[(max_new, "stock beam")])
        base_mem = peaks[(max_new, "stock beam")]
        base_step = base_time / max_new
        for name in args.searches:
            runs = timings[(max_new, name)]
            seconds = statistics.median(r["seconds"] for r in runs)
            memory = peaks[(max_new, name)]
            steps = runs[-1]["steps"]
            rows.append((max_new, name, seconds, seconds / base_time, memory / 2**20,
                         memory / base_mem if base_mem else float("nan"), steps,
                         runs[-1]["rollbacks"], seconds / steps / base_step))

    header = (f"{'new':>4}  {'search':<22} {'time s':>7} {'x stock':>7} {'peak MiB':>8} {'x stock':>7} "
              f"{'steps':>5} {'rollbacks':>9} {'per step x stock':>16}")
    print(header)
    print("-" * len(header))
    for max_new, name, seconds, ratio, mib, mem_ratio, steps, rollbacks, step_ratio in rows:
        print(f"{max_new:>4}  {name:<22} {seconds:>7.2f} {ratio:>7.2f} {mib:>8.1f} {mem_ratio:>7.2f} "
              f"{steps:>5} {rollbacks:>9} {step_ratio:>16.2f}")
    print("steps: decoding steps including those redone after rollbacks; per step x stock: time per decoding "
          "step relative to stock beam search's time per token.")


if __name__ == "__main__":
    main()
