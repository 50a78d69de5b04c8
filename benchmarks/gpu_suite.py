"""GPU benchmark suite: the README's speed and memory claims measured at LLaVA-1.5-7B scale, in one run.

    python benchmarks/gpu_suite.py --out gpu_suite.json     # one GPU: random-init LLaVA-1.5-7B shapes, bf16
    python benchmarks/gpu_suite.py --small --out small.json # CPU smoke mode on a tiny config (run by the tests)

Every figure is a ratio of two variants measured side by side in this run: interleaved repeats after a
warm-up, the median of the repeats. Parts (`--parts` picks some):

  engine         idle engine (our decoding loop, engine registered, no operations) greedy / stock SDPA generate
  interventions  PAI, AAI, VCD, FastV, truncation (defaults) / greedy: time; FastV also its KV cache
  capture        one captured layer (`explain`) / stock output_attentions=True (eager, all layers): time, memory
  pope           POPE answering (the `eval pope` path) batched 8 and 32 / one by one: questions per second
  chair          CHAIR captioning (the `eval chair` path) at 512 new tokens, batched / one by one: captions/s
  opera          OPERA (5 beams, defaults) / stock beam search (5 beams): time and peak memory, 64 and 256 tokens

No weights are needed: the model is random-initialised directly on the GPU (bf16 by default). EOS is disabled,
so every run decodes exactly its number of new tokens. GPU timing: `torch.cuda.synchronize()` before and after
every timed run; peak memory: `torch.cuda.max_memory_allocated()` during the run minus what was allocated
before it (the weights), the median over the repeats. On the CPU (`--small`) peak memory is the resident
set's high-water mark growth, a sanity figure only.

Budget: sized for under 8 minutes end to end on one H200. Estimated from the work (~30 ms per decode step of
a 7B model in an eager-PyTorch loop; not yet measured): build 30 s, engine 15 s, interventions 25 s, capture
10 s, POPE 20 s, CHAIR 35 s, OPERA 90 s, about 4 minutes. OPERA runs last, because on random weights its
rollbacks (hence its decoding steps) cannot be sized ahead. Each part's wall time is printed as it finishes;
once `--budget-seconds` (default 450) have passed no further part or OPERA length is started (recorded as
skipped), and the JSON file is rewritten after every part, so a run cut short keeps what it measured. A part
that fails is recorded with its error and the others still run (exit status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "Please describe this image in detail."
POPE_SUFFIX = " Please answer this question with one word."


@dataclass(frozen=True)
class SuiteSize:
    """Model shapes and the amount of work of every part (`FULL` for a GPU, `SMALL` for the CPU smoke run)."""

    name: str
    shape: str  # what the model is, for the table's title
    text: dict[str, Any] | None
    vision: dict[str, Any] | None
    image_size: int
    patch_size: int
    scale: float  # weight scaling of the random init (tiny models need it to vary their tokens)
    dtype: str
    device: str
    budget_seconds: float
    repeats: int = 3
    engine_tokens: int = 64
    beams: int = 5
    opera_tokens: tuple[int, ...] = (64, 256)
    intervention_tokens: int = 32
    interventions: tuple[str, ...] = ("pai", "aai", "vcd", "fastv", "truncate")
    capture_tokens: int = 32
    capture_layer: int = 14
    pope_images: int = 8
    pope_per_image: int = 4
    pope_batches: tuple[int, ...] = (8, 32)
    pope_tokens: int = 4
    chair_tokens: int = 512
    chair_batch: int = 16
    chair_repeats: int = 1  # one 512-token run is long enough that its noise is small
    photo_size: tuple[int, int] = (640, 480)  # POPE/CHAIR images: COCO's usual size, so preprocessing costs as much


def _full() -> SuiteSize:
    from bench_common import LLAVA15_7B_TEXT, LLAVA15_7B_VISION

    return SuiteSize(name="full", shape="random-init LLaVA-1.5-7B shapes", text=LLAVA15_7B_TEXT,
                     vision=LLAVA15_7B_VISION, image_size=336, patch_size=14, scale=1.0, dtype="bfloat16",
                     device="cuda", budget_seconds=450.0)


def _small() -> SuiteSize:
    # A 4-layer model with 64 image tokens: every code path of the full run, in seconds on one CPU thread.
    return SuiteSize(name="small", shape="random-init tiny LLaVA", image_size=112, patch_size=14, scale=8.0,
                     text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=4),
                     vision=None, dtype="float32", device="cpu", budget_seconds=600.0, repeats=1,
                     engine_tokens=8, opera_tokens=(28,), intervention_tokens=6,
                     interventions=("pai", "aai", "vcd", "fastv", "truncate:layer=2"), capture_tokens=6,
                     capture_layer=2, pope_images=4, pope_per_image=2, pope_batches=(4, 8), pope_tokens=3,
                     chair_tokens=16, chair_batch=4, photo_size=(160, 120))


@dataclass
class Row:
    """One figure: `value` of the measured variant against `baseline`; `ratio` = value / baseline."""

    part: str
    figure: str
    value: float
    baseline: float
    unit: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Context:
    vlm: Any
    size: SuiteSize
    device: Any  # torch.device
    repeats: int
    image: Any
    batch: Any  # the encoded (image, PROMPT) batch of one
    deadline: float = float("inf")  # time.perf_counter() after which no new measurement starts
    notes: list[str] = field(default_factory=list)  # what a part left out, for its status line


@dataclass
class Sample:
    seconds: float
    peak_bytes: int
    result: Any


def side_by_side(ctx: Context, variants: dict[str, Callable[[], Any]], repeats: int | None = None,
                 warmups: dict[str, Callable[[], Any]] | None = None,
                 modes: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[Sample]]:
    """Warm every variant up (short runs), then time them interleaved, `repeats` times, so that load changes
    and clock drift hit every variant alike; the last sample of each keeps its result. `modes[name]()`: a context manager entered around each of that
    variant's runs, outside the timed block (e.g. switching the attention implementation)."""
    from bench_common import measure

    def within(name: str) -> Any:
        return modes[name]() if modes and name in modes else contextlib.nullcontext()

    for name, fn in (warmups or variants).items():
        with within(name):
            fn()
    samples: dict[str, list[Sample]] = {name: [] for name in variants}
    for _ in range(repeats or ctx.repeats):
        for name, fn in variants.items():
            if samples[name]:
                samples[name][-1].result = None  # keep only the last run's output (GPU memory, the next peak)
            with within(name):
                samples[name].append(Sample(*measure(fn, ctx.device)))
    return samples


def med_seconds(samples: list[Sample]) -> float:
    from bench_common import median

    return median([s.seconds for s in samples])


def med_peak_mib(samples: list[Sample]) -> float:
    from bench_common import median

    return median([s.peak_bytes for s in samples]) / 2**20


def stock_generate(ctx: Context, new_tokens: int, **kwargs: Any) -> Any:
    """Stock transformers `generate` on the pre-encoded batch, exactly `new_tokens` tokens."""
    batch = ctx.batch
    return ctx.vlm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  **batch.model_inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, **kwargs)


def _new_ids(ctx: Context, out: Any) -> list[int]:
    sequences = out.sequences if hasattr(out, "sequences") else out
    return sequences[0, ctx.batch.input_ids.shape[1]:].tolist()


# --- parts ----------------------------------------------------------------------------------------------------

def part_engine(ctx: Context) -> list[Row]:
    from vlmscope.decoding.greedy import Greedy

    n = ctx.size.engine_tokens
    variants = {"stock": lambda: stock_generate(ctx, n),
                "ours": lambda: ctx.vlm.generate_batch(ctx.batch, n, Greedy())}
    warmups = {"stock": lambda: stock_generate(ctx, 2),
               "ours": lambda: ctx.vlm.generate_batch(ctx.batch, 2, Greedy())}
    samples = side_by_side(ctx, variants, warmups=warmups)
    stock_ids = _new_ids(ctx, samples["stock"][-1].result)
    ours_ids = samples["ours"][-1].result[0].token_ids
    if len(stock_ids) != n or len(ours_ids) != n:
        raise RuntimeError(f"engine: {len(stock_ids)} stock and {len(ours_ids)} own tokens, expected {n}")
    return [Row("engine", f"greedy {n} tokens: idle engine / stock SDPA generate, time",
                med_seconds(samples["ours"]), med_seconds(samples["stock"]), "s",
                {"new_tokens": n, "same_tokens_as_stock": ours_ids == stock_ids,
                 "stock": "model.generate(do_sample=False), attn_implementation sdpa"})]


def part_opera(ctx: Context) -> list[Row]:
    from bench_opera import run_opera  # a sibling script in benchmarks/

    from vlmscope.decoding.opera import OperaDecoding
    from vlmscope.registry import spec_string

    beams = ctx.size.beams
    spec = spec_string(OperaDecoding(num_beams=beams))
    rows = []
    for n in ctx.size.opera_tokens:
        if rows and time.perf_counter() > ctx.deadline:
            ctx.notes.append(f"{n} tokens skipped (time budget)")
            continue
        variants = {"stock": lambda n=n: stock_generate(ctx, n, num_beams=beams),
                    "opera": lambda n=n: run_opera(ctx.vlm, ctx.batch, beams, n)}
        warmups = {"stock": lambda: stock_generate(ctx, 4, num_beams=beams),
                   "opera": lambda: run_opera(ctx.vlm, ctx.batch, beams, 4)}
        samples = side_by_side(ctx, variants, warmups=warmups)
        info = samples["opera"][-1].result
        if info["tokens"] != n:
            raise RuntimeError(f"opera: {info['tokens']} tokens, expected {n}")
        details = {"new_tokens": n, "beams": beams, "spec": spec, "rollbacks": info["rollbacks"],
                   "decoding_steps": info["steps"], "stock": f"model.generate(num_beams={beams}, do_sample=False)"}
        rows.append(Row("opera", f"{n} tokens, {beams} beams: OPERA (defaults) / stock beam search, time",
                        med_seconds(samples["opera"]), med_seconds(samples["stock"]), "s", details))
        rows.append(Row("opera", f"{n} tokens, {beams} beams: OPERA (defaults) / stock beam search, peak memory",
                        med_peak_mib(samples["opera"]), med_peak_mib(samples["stock"]), "MiB", dict(details)))
    return rows


def part_interventions(ctx: Context) -> list[Row]:
    from bench_interventions import measure as measure_intervention  # a sibling script in benchmarks/

    from vlmscope.interventions import INTERVENTIONS
    from vlmscope.registry import spec_string

    n = ctx.size.intervention_tokens
    device = str(ctx.device)
    specs: dict[str, str | None] = {"greedy": None, **{spec: spec for spec in ctx.size.interventions}}
    for spec in specs.values():  # warm-up (allocator, lazy imports, AAI's reference pass)
        measure_intervention(ctx.vlm, ctx.batch, spec, 2, device)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in specs}
    for _ in range(ctx.repeats):
        for name, spec in specs.items():
            runs[name].append(measure_intervention(ctx.vlm, ctx.batch, spec, n, device))

    def med(name: str, key: str) -> float:
        from bench_common import median

        return median([r[key] for r in runs[name]])

    rows = []
    for name in ctx.size.interventions:
        full_spec = spec_string(INTERVENTIONS.parse(name))
        details = {"new_tokens": n, "spec": full_spec, "prefill_seconds": med(name, "prefill"),
                   "greedy_prefill_seconds": med("greedy", "prefill"), "decode_step_seconds": med(name, "decode"),
                   "greedy_decode_step_seconds": med("greedy", "decode")}
        method = full_spec.split(":")[0]
        defaults = full_spec == spec_string(INTERVENTIONS.parse(method))
        label = f"{method} (defaults)" if defaults else name
        rows.append(Row("interventions", f"greedy {n} tokens: {label} / greedy, time",
                        med(name, "total"), med("greedy", "total"), "s", details))
        if method == "fastv":
            rows.append(Row("interventions", f"greedy {n} tokens: {label} / greedy, KV cache",
                            med(name, "kv_mib"), med("greedy", "kv_mib"), "MiB", {"spec": full_spec}))
    return rows


def part_capture(ctx: Context) -> list[Row]:
    from vlmscope.explain.maps import explain

    n, layer = ctx.size.capture_tokens, ctx.size.capture_layer
    model = ctx.vlm.model
    previous = model.config.get_text_config()._attn_implementation

    @contextlib.contextmanager
    def eager() -> Iterator[None]:
        model.set_attn_implementation({"text_config": "eager"})  # output_attentions needs eager attention
        try:
            yield
        finally:
            model.set_attn_implementation({"text_config": previous})

    def stock(tokens: int) -> Any:
        return stock_generate(ctx, tokens, output_attentions=True, return_dict_in_generate=True)

    def ours(tokens: int) -> Any:
        return explain(ctx.vlm, ctx.image, PROMPT, layers=[layer], max_new_tokens=tokens)

    samples = side_by_side(ctx, {"stock": lambda: stock(n), "ours": lambda: ours(n)},
                           warmups={"stock": lambda: stock(2), "ours": lambda: ours(2)}, modes={"stock": eager})
    if model.config.get_text_config()._attn_implementation != previous:
        raise RuntimeError("capture: the attention implementation was not restored")
    out, result = samples["stock"][-1].result, samples["ours"][-1].result
    stock_kept = sum(a.numel() for step in out.attentions for a in step)
    ours_kept = sum(int(m.size) for m in result.grid_maps.values())
    if len(result.token_ids) != n or len(out.attentions) != n:
        raise RuntimeError(f"capture: {len(result.token_ids)} own and {len(out.attentions)} stock steps, expected {n}")
    details = {"new_tokens": n, "layer": layer, "attention_values_kept": ours_kept,
               "stock_attention_values_kept": stock_kept, "same_tokens_as_stock": result.token_ids == _new_ids(ctx, out),
               "ours": "vlmscope explain(layers=[layer]) incl. image preprocessing",
               "stock": "model.generate(output_attentions=True), eager attention on every layer"}
    return [Row("capture", f"greedy {n} tokens: one captured layer / stock output_attentions, time",
                med_seconds(samples["ours"]), med_seconds(samples["stock"]), "s", details),
            Row("capture", f"greedy {n} tokens: one captured layer / stock output_attentions, peak memory",
                med_peak_mib(samples["ours"]), med_peak_mib(samples["stock"]), "MiB", dict(details))]


def part_pope(ctx: Context) -> list[Row]:
    from bench_common import median
    from bench_pope import run_once, write_questions  # a sibling script in benchmarks/

    size, device = ctx.size, str(ctx.device)
    sizes = [1, *size.pope_batches]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        questions = write_questions(root, size.pope_images, size.pope_per_image, *size.photo_size)
        run_once(ctx.vlm, questions, root, max(sizes), 1, device)  # warm-up at the largest batch
        seconds: dict[int, list[float]] = {b: [] for b in sizes}
        answers: dict[int, list[str]] = {}
        for _ in range(ctx.repeats):
            for b in sizes:
                elapsed, answers[b] = run_once(ctx.vlm, questions, root, b, size.pope_tokens, device)
                seconds[b].append(elapsed)
    rate = {b: len(questions) / median(seconds[b]) for b in sizes}
    rows = []
    for b in size.pope_batches:
        same = sum(x == y for x, y in zip(answers[b], answers[1]))
        rows.append(Row("pope", f"{len(questions)} questions, {size.pope_tokens} tokens: batch {b} / one by one, "
                                "questions/s", rate[b], rate[1], "1/s",
                        {"questions": len(questions), "batch_size": b, "answers_equal_to_one_by_one": same}))
    return rows


def part_chair(ctx: Context) -> list[Row]:
    from bench_common import median, random_image

    from vlmscope.eval.model_eval import caption_fn
    from vlmscope.eval.runner import caption_images

    size = ctx.size
    n, b = size.chair_tokens, size.chair_batch
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        items = []
        for i in range(b):
            path = root / f"COCO_val2014_{i + 1:012d}.jpg"
            random_image(100 + i, *size.photo_size).save(path)
            items.append((i + 1, str(path)))
        caption = caption_fn(ctx.vlm, PROMPT, n, "greedy", [])
        short = caption_fn(ctx.vlm, PROMPT, 2, "greedy", [])
        runs = 0

        def run(fn: Any, chosen: list[tuple[int, str]], batch_size: int) -> list[dict[str, Any]]:
            nonlocal runs
            runs += 1  # a fresh store each run: a store that has the captions would skip them
            store = caption_images(chosen, fn, root / f"captions{runs}.jsonl", batch_size, progress=False)
            return store.rows()

        variants = {1: lambda: run(caption, items[:1], 1), b: lambda: run(caption, items, b)}
        warmups = {1: lambda: run(short, items[:1], 1), b: lambda: run(short, items, b)}
        samples = side_by_side(ctx, variants, repeats=size.chair_repeats, warmups=warmups)
    rate = {k: len(samples[k][-1].result) / median([s.seconds for s in v]) for k, v in samples.items()}
    return [Row("chair", f"captioning, {n} new tokens: batch {b} / one by one, captions/s", rate[b], rate[1], "1/s",
                {"new_tokens": n, "captions": len(samples[b][-1].result), "batch_size": b,
                 "repeats": size.chair_repeats})]


# OPERA last: on random weights its rollbacks (hence its steps) are the one cost that cannot be sized ahead.
PARTS: dict[str, Callable[[Context], list[Row]]] = {
    "engine": part_engine,
    "interventions": part_interventions,
    "capture": part_capture,
    "pope": part_pope,
    "chair": part_chair,
    "opera": part_opera,
}


# --- driver ---------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny config on the CPU (the test suite's smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON to this file")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --small")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16, or float32 with --small")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 3, small 1)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="start no part after this many seconds (default 450, small 600)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[SuiteSize, list[str]]:
    """Everything that can be wrong with the arguments, before anything heavy runs or is written."""
    import torch

    from vlmscope.errors import InputError

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise InputError(f"unknown part(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(PARTS)}")
    size = _small() if args.small else _full()
    size = replace(size, device=args.device or size.device, dtype=args.dtype or size.dtype)
    if args.repeats is not None:
        if args.repeats < 1:
            raise InputError("--repeats must be at least 1")
        size = replace(size, repeats=args.repeats)
    if args.budget_seconds is not None:
        size = replace(size, budget_seconds=args.budget_seconds)
    try:
        device = torch.device(size.device)
    except RuntimeError:
        raise InputError(f"unknown device {size.device!r}: use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("no CUDA device here: run on a GPU machine, or use --small for the CPU mode")
    if args.out is not None:
        if args.out.is_dir():
            raise InputError(f"--out {args.out} is a directory: give a file name, e.g. {args.out / 'gpu_suite.json'}")
        if not args.out.parent.is_dir():
            raise InputError(f"--out: directory {args.out.parent} does not exist: create it first")
    if args.threads < 1:
        raise InputError("--threads must be at least 1")
    return size, parts


def build_context(size: SuiteSize, repeats: int) -> Context:
    import torch
    from bench_common import build_llava_vlm, random_image

    vlm = build_llava_vlm(size.text, size.vision, device=size.device, dtype=getattr(torch, size.dtype),
                          scale=size.scale, image_size=size.image_size, patch_size=size.patch_size,
                          fixed_length=True)
    image = random_image(0, 500, 400)
    return Context(vlm=vlm, size=size, device=torch.device(size.device), repeats=repeats, image=image,
                   batch=vlm.encode([image], [PROMPT]))


def device_name(device: Any) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"


def format_value(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    return f"{value:.2f} {unit}"


def table(rows: Sequence[Row]) -> str:
    header = ("part", "figure", "measured", "against", "ratio")
    cells = [(r.part, r.figure, format_value(r.value, r.unit), format_value(r.baseline, r.unit), f"{r.ratio:.3f}x")
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths)))
              for cell in cells]
    return "\n".join(lines)


def markdown(rows: Sequence[Row], device: str, size: SuiteSize) -> str:
    """The table as a README block: date, device, model, then one line per figure."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [f"Measured {day} on {device}: {size.shape}, {size.dtype}, median of {size.repeats} "
             "interleaved repeats (`benchmarks/gpu_suite.py`).", "",
             "| part | figure | measured | against | ratio |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r.part} | {r.figure} | {format_value(r.value, r.unit)} | {format_value(r.baseline, r.unit)} | "
              f"{r.ratio:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file and rename, so that a run killed mid-write leaves the previous version."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_suite(size: SuiteSize, parts: Sequence[str], out: Path | None) -> int:
    import torch

    from vlmscope.interventions import INTERVENTIONS
    from vlmscope.provenance import provenance
    from vlmscope.registry import spec_string

    start = time.perf_counter()
    ctx = build_context(size, size.repeats)
    ctx.deadline = start + size.budget_seconds
    build_seconds = time.perf_counter() - start
    gpu = device_name(ctx.device)
    image_tokens = int(ctx.batch.image_mask.sum())
    title = (f"vlmscope GPU suite ({size.name}): {size.shape}, {size.dtype}, {gpu}, {image_tokens} image tokens, "
             f"prompt {ctx.batch.input_ids.shape[1]} tokens, median of {size.repeats} interleaved repeats")
    print(title, flush=True)
    print(f"[build] {build_seconds:.1f} s", flush=True)
    rows: list[Row] = []
    status: dict[str, dict[str, Any]] = {"build": {"status": "ok", "wall_seconds": build_seconds}}

    def payload() -> dict[str, Any]:
        specs = [spec_string(INTERVENTIONS.parse(s)) for s in size.interventions]
        record = provenance(model_id=size.shape, decoding=None, interventions=specs, seed=0, device=ctx.device,
                            dtype=size.dtype, wall_seconds=time.perf_counter() - start, device_name=gpu,
                            suite=size.name, image_tokens=image_tokens,
                            prompt_tokens=int(ctx.batch.input_ids.shape[1]))
        return {"title": title, "provenance": record, "size": asdict(size), "parts": status,
                "rows": [r.to_json() for r in rows], "readme_markdown": markdown(rows, gpu, size)}

    failed = False
    for name in parts:
        elapsed = time.perf_counter() - start
        if elapsed > size.budget_seconds:
            status[name] = {"status": f"skipped: {elapsed:.0f} s passed, budget {size.budget_seconds:.0f} s",
                            "wall_seconds": 0.0}
            print(f"[{name}] skipped (time budget)", flush=True)
            continue
        part_start = time.perf_counter()
        ctx.notes.clear()
        try:
            with torch.no_grad():
                part_rows = PARTS[name](ctx)
            rows.extend(part_rows)
            status[name] = {"status": "; ".join(["ok", *ctx.notes]), "wall_seconds": time.perf_counter() - part_start}
        except Exception as exc:  # one broken part must not cost the rest of a scarce GPU slot
            failed = True
            traceback.print_exc()
            status[name] = {"status": f"failed: {type(exc).__name__}: {exc}",
                            "wall_seconds": time.perf_counter() - part_start}
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[{name}] {status[name]['status']}, {status[name]['wall_seconds']:.1f} s", flush=True)
        if out is not None:
            write_json(out, payload())
    total = time.perf_counter() - start
    print()
    print(table(rows))
    print("ratio = measured / against; time and memory: lower is better, questions/s and captions/s: higher.")
    print("wall time: " + ", ".join(f"{k} {v['wall_seconds']:.1f} s" for k, v in status.items())
          + f"; total {total:.1f} s")
    if out is not None:
        final = payload()
        final["total_seconds"] = total
        write_json(out, final)
        print(f"wrote {out}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    from vlmscope.errors import InputError

    args = parse_args(argv)
    try:
        size, parts = check_args(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    return run_suite(size, parts, args.out)


if __name__ == "__main__":
    sys.exit(main())
