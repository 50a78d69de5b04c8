"""Engine overhead, side by side in one run.

1. idle engine: vlmscope greedy generate (own loop, engine registered, no ops) / stock SDPA `generate`;
2. one captured layer (last row, image columns, every generated token) / stock `output_attentions=True` on
   all layers (eager), time and peak memory;
3. the per-token cost of entering a plan: main before issue 13 switched the attention implementation on
   every forward (two walks over the model's modules per token); now a run switches it once and each forward
   only activates its plan. Measured side by side (interleaved repeats; CPU time of the process on CPU): the
   entry alone (µs per forward) and a greedy generation with a plan op (PAI alpha=0 on every layer), ms per
   token, with the old per-forward switch re-enacted.

Default: a small LLaVA config with 576 image tokens (336 px, patch 14) on CPU. `--device cuda --full` uses
LLaVA-1.5-7B shapes with random weights (needs a GPU with ~16 GB).
Peak memory: CUDA max_memory_allocated on GPU; on CPU the peak RSS growth of a fresh subprocess per variant.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_common import LLAVA15_7B_TEXT, LLAVA15_7B_VISION, build_llava_vlm, sync  # a sibling module


def build(full: bool, device: str):
    if full:
        text, vision = LLAVA15_7B_TEXT, LLAVA15_7B_VISION
    else:
        text = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8)
        vision = None
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    return build_llava_vlm(text, vision, device=device, dtype=dtype)


def image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8"))


def stock_inputs(vlm, prompt):
    text = vlm.adapter.render_prompt(prompt)
    inputs = vlm.processor(images=[image()], text=[text], return_tensors="pt").to(vlm.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(vlm.dtype)
    return inputs


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variant(name: str, vlm, tokens: int, layer: int):
    prompt = "describe this image ."
    if name == "stock_sdpa":
        inputs = stock_inputs(vlm, prompt)
        return lambda: vlm.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if name == "ours_idle":
        return lambda: vlm.generate(image(), prompt, max_new_tokens=tokens)
    if name == "stock_all_attentions":
        inputs = stock_inputs(vlm, prompt)
        vlm.model.set_attn_implementation({"text_config": "eager"})
        return lambda: vlm.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                          output_attentions=True, return_dict_in_generate=True)
    if name == "ours_one_layer":
        from vlmscope.explain.maps import explain

        return lambda: explain(vlm, image(), prompt, layers=[layer], max_new_tokens=tokens)
    raise ValueError(name)


class _PerForwardSwitchRun:
    """Mixin re-enacting main before issue 13: every forward switched the implementation in and back out."""

    def _forward(self, **kwargs):
        from vlmscope.attention.engine import ATTN_KEY, _set_impl, _text_config_names

        previous = _text_config_names(self.model)
        _set_impl(self.model, {k: ATTN_KEY for k in previous})
        try:
            return super()._forward(**kwargs)
        finally:
            _set_impl(self.model, previous)


def plan_entry(vlm, tokens: int, repeats: int, device: str) -> dict[str, float]:
    """Before/after of entering a plan: per forward (entry alone) and per generated token (greedy + PAI)."""
    from vlmscope.attention.engine import (
        ATTN_KEY,
        AttentionPlan,
        _set_impl,
        _text_config_names,
        attention_engine,
        attention_plan,
        decoder_attention_modules,
    )
    from vlmscope.decoding import DECODINGS
    from vlmscope.decoding.session import GenerationRun
    from vlmscope.interventions import INTERVENTIONS

    model = vlm.model
    plan = AttentionPlan(decoder_attention_modules(model))
    entries = 200

    def enter_before():
        for _ in range(entries):
            previous = _text_config_names(model)
            _set_impl(model, {k: ATTN_KEY for k in previous})
            _set_impl(model, previous)

    def enter_after():
        with attention_engine(model):  # what a run holds
            for _ in range(entries):
                with attention_plan(model, plan):
                    pass

    legacy_cls = type("PerForwardSwitchRun", (_PerForwardSwitchRun, GenerationRun), {})
    greedy = DECODINGS.create("greedy")
    pai = INTERVENTIONS.parse("pai:alpha=0,start=0")
    batch = vlm.encode([image()], ["describe this image ."])

    def generate(run_cls):
        def fn():
            with torch.no_grad(), run_cls(model, vlm.adapter, batch, [pai]) as run:
                greedy.decode(run, tokens, [], 0)  # no EOS: exactly `tokens` tokens
        return fn

    variants = {"entry_before": enter_before, "entry_after": enter_after,
                "generate_before": generate(legacy_cls), "generate_after": generate(GenerationRun)}
    for fn in variants.values():
        fn()  # warm-up
    # Interleaved repeats (before, after, before, ...) so load from other processes hits both alike; on CPU the
    # process's own CPU time (one thread) rather than wall time.
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync(device)
            start = clock()
            fn()
            sync(device)
            samples[name].append(clock() - start)
    out = {name: statistics.median(values) for name, values in samples.items()}
    out["entry_before"] /= entries
    out["entry_after"] /= entries
    out["generate_before"] /= tokens
    out["generate_after"] /= tokens
    return out


def print_plan_entry(cost: dict[str, float], layers: int, modules: int) -> None:
    print(f"entering a plan, per forward ({layers} decoder layers, {modules} modules): "
          f"before {cost['entry_before'] * 1e6:.1f} us, after {cost['entry_after'] * 1e6:.2f} us "
          f"({cost['entry_before'] / max(cost['entry_after'], 1e-12):.0f}x less)")
    saved = cost["generate_before"] - cost["generate_after"]
    expected = cost["entry_before"] - cost["entry_after"]  # one forward per token
    print(f"greedy + pai:alpha=0 on every layer, per token: before {cost['generate_before'] * 1e3:.2f} ms, "
          f"after {cost['generate_after'] * 1e3:.2f} ms (saved {saved * 1e3:.2f} ms per token, "
          f"{saved / cost['generate_before'] * 100:.1f} %; the entry cost alone predicts {expected * 1e3:.2f} ms)")


def measure_child(args) -> None:
    """Run one variant in this (fresh) process and print its peak-memory growth."""
    torch.set_num_threads(args.threads)
    vlm = build(args.full, args.device)
    fn = variant(args.child, vlm, args.tokens, args.layer)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_now()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_bytes": max(0, peak)}))


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shapes (GPU)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plan-entry-only", action="store_true", help="only part 3 (before/after plan entry)")
    args = parser.parse_args()
    if args.child:
        measure_child(args)
        return
    torch.set_num_threads(args.threads)
    vlm = build(args.full, args.device)
    layers, modules = vlm.adapter.num_layers, sum(1 for _ in vlm.model.modules())
    if args.plan_entry_only:
        print(f"config: {'LLaVA-1.5-7B shapes' if args.full else 'small'}, {args.tokens} new tokens, "
              f"device {args.device}, median of {args.repeats}")
        print_plan_entry(plan_entry(vlm, args.tokens, args.repeats, args.device), layers, modules)
        return
    times = {}
    for name in ("stock_sdpa", "ours_idle"):
        fn = variant(name, vlm, args.tokens, args.layer)
        fn()  # warm-up
        times[name] = timed(fn, args.device, args.repeats)
    have_explain = True
    try:
        import vlmscope.explain.maps  # noqa: F401
    except ImportError:
        have_explain = False
    names = ["stock_all_attentions"] + (["ours_one_layer"] if have_explain else [])
    for name in names:
        fn = variant(name, vlm, args.tokens, args.layer)
        fn()
        times[name] = timed(fn, args.device, args.repeats)
        vlm.model.set_attn_implementation({"text_config": "sdpa"})
    peaks = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--tokens", str(args.tokens),
               "--layer", str(args.layer), "--threads", str(args.threads)] + (["--full"] if args.full else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[name] = json.loads(out)["peak_bytes"]
    n_img = 576
    print(f"config: {'LLaVA-1.5-7B shapes' if args.full else 'small'} with {n_img} image tokens, "
          f"{args.tokens} new tokens, device {args.device}, median of {args.repeats}")
    for name, seconds in times.items():
        print(f"  {name:22s} {seconds * 1000:9.1f} ms")
    print(f"idle engine / stock SDPA generate: {times['ours_idle'] / times['stock_sdpa']:.3f}x  (goal <= 1.03)")
    if have_explain:
        print(f"one captured layer / stock output_attentions (all layers): time "
              f"{times['ours_one_layer'] / times['stock_all_attentions']:.3f}x, peak memory "
              f"{peaks['ours_one_layer'] / max(1, peaks['stock_all_attentions']):.3f}x "
              f"({peaks['ours_one_layer'] / 2**20:.1f} MiB vs {peaks['stock_all_attentions'] / 2**20:.1f} MiB)")
    print_plan_entry(plan_entry(vlm, args.tokens, args.repeats, args.device), layers, modules)


if __name__ == "__main__":
    main()
