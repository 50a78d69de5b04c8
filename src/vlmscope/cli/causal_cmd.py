"""`vlmscope lens | ablate | patch`: causal tools on image tokens (see vlmscope.explain.causal)."""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path
from typing import Any

from vlmscope.cli._common import (
    add_json_arg,
    add_model_args,
    check_out_dir,
    clear_owned,
    emit_json,
    human_stream,
    load_vlm,
    min_int,
)

OWNED = {"lens": ("lens.npz", "run.json", "lens.png"), "ablate": ("ablate.npz", "run.json"),
         "patch": ("patch.npz", "run.json", "patch.png")}


def _owned(command: str) -> Any:
    return lambda name: any(fnmatch.fnmatch(name, pattern) for pattern in OWNED[command])


def _common(p: argparse.ArgumentParser, answer: bool = True) -> None:
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file" + (" (the clean one)" if answer else ""))
    p.add_argument("--prompt", required=True, help="question or instruction")
    p.add_argument("--layers", default="all", help="all, 14, 0-3 or 10,14")
    if answer:
        p.add_argument("--answer", default=None, help="the answer to score (default: the greedy answer)")
        p.add_argument("--max-new-tokens", type=min_int(1), default=32, help="length of the greedy answer")
    p.add_argument("--out", required=True, help="output folder (run.json + arrays; a re-run replaces them)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("lens", help="logit lens over the image tokens (top tokens, a word's probability map)",
                              description="Per decoder layer, decode the residual stream at every image token "
                              "through the final norm and unembedding: top-k tokens and a word's probability.")
    _common(p, answer=False)
    p.add_argument("--word", default=None, help="object whose probability is mapped over the image, e.g. dog")
    p.add_argument("--top-k", type=min_int(1), default=5)
    add_json_arg(p, "print a JSON summary on stdout")
    p.set_defaults(func=run_lens)

    p = subparsers.add_parser("ablate", help="head ablation: change of the answer's log-probability per head",
                              description="Zero or mean-ablate each chosen head (and all together) and rank "
                              "heads by the drop of the answer's log-probability.")
    _common(p)
    p.add_argument("--heads", default="all", help="heads of every chosen layer: all, 0-7, 3,5")
    p.add_argument("--mode", default="zero", choices=["zero", "mean"],
                   help="zero: the head's output removed; mean: replaced by its mean over the positions")
    p.add_argument("--top", type=min_int(1), default=10, help="heads listed in the summary")
    add_json_arg(p, "print a JSON summary on stdout")
    p.set_defaults(func=run_ablate)

    p = subparsers.add_parser("patch", help="activation patching: which layers/image tokens restore the answer",
                              description="Copy the residual stream entering each layer at the image tokens "
                              "from the clean image's run into the corrupted image's run and measure how much "
                              "of the clean answer's log-probability comes back.")
    _common(p)
    p.add_argument("--corrupt-image", required=True, help="the corrupted image (same size as --image)")
    p.add_argument("--positions", default="image", choices=["image", "each"],
                   help="image: all image tokens at once per layer; each: also one grid token at a time (a map)")
    add_json_arg(p, "print a JSON summary on stdout")
    p.set_defaults(func=run_patch)


def _prepare(args: argparse.Namespace, command: str) -> tuple[Any, Any, Path]:
    from vlmscope.explain.select import check_range, parse_indices
    from vlmscope.images import load_image
    from vlmscope.results import check_output_dir

    check_output_dir(args.out, command)
    out = check_out_dir(args.out, _owned(command), command)
    layers = parse_indices(args.layers, "layer")
    if getattr(args, "heads", None) is not None:
        parse_indices(args.heads, "head")
    image = load_image(args.image)
    if getattr(args, "answer", None) is not None and not args.answer.strip():
        from vlmscope.errors import InputError

        raise InputError("empty --answer: give the answer text, or omit it to score the greedy answer")
    vlm = load_vlm(args)
    check_range(layers, vlm.adapter.num_layers, "layer")
    return vlm, image, out


def _figure(path: Path, image: Any, maps: Any, region: Any, titles: list[str], shared: bool) -> str:
    from vlmscope.explain import render

    limits = render.color_limits(list(maps), "shared" if shared else "per-map")
    fig = render.overlay_grid(image, list(maps), region, titles, limits, columns=min(8, len(titles)))
    fig.savefig(path)
    return str(path)


def run_lens(args: argparse.Namespace) -> int:
    from vlmscope.explain.causal import logit_lens, word_token

    vlm, image, out = _prepare(args, "lens")
    if args.word is not None:
        word_token(vlm.adapter.tokenizer, args.word)
    result = logit_lens(vlm, image, args.prompt, word=args.word, layers=args.layers, top_k=args.top_k)
    clear_owned(out, _owned("lens"))
    written = result.save(out)
    if args.word is not None:
        written["figure"] = _figure(out / "lens.png", image, result.word_probs, result.grid.region,
                                    [f"L{layer} p({result.word_token.strip()})" for layer in result.layers], True)
    text = human_stream(args)
    grid = result.grid
    for li, layer in enumerate(result.layers):
        centre = result.top_tokens(layer, grid.height // 2, grid.width // 2)
        line = f"layer {layer}: centre token top {[t for t, _ in centre[:3]]}"
        if args.word is not None:
            line += f", max p({args.word}) {result.word_probs[li].max():.4f}"
        print(line, file=text)
    print(f"saved {out}", file=text)
    text.flush()
    if args.json:
        emit_json({"out": str(out), "layers": result.layers, "word": args.word,
                   "word_token": result.word_token, "max_word_prob": [float(m.max()) for m in result.word_probs],
                   "files": written})
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from vlmscope.explain.causal import ablate_heads

    vlm, image, out = _prepare(args, "ablate")
    result = ablate_heads(vlm, image, args.prompt, answer=args.answer, heads=args.heads, layers=args.layers,
                          mode=args.mode, max_new_tokens=args.max_new_tokens)
    clear_owned(out, _owned("ablate"))
    written = result.save(out)
    text = human_stream(args)
    print(f"answer {result.answer!r}: log p = {result.logprob:.4f}", file=text)
    for layer, head, effect in result.top(args.top):
        print(f"  L{layer}H{head}: {effect:+.4f}", file=text)
    if result.joint_effect is not None:
        print(f"  all {len(result.heads)} heads together: {result.joint_effect:+.4f}", file=text)
    text.flush()
    if args.json:
        emit_json({"out": str(out), "answer": result.answer, "logprob": result.logprob,
                   "top": [list(t) for t in result.top(args.top)], "joint_effect": result.joint_effect,
                   "files": written})
    return 0


def run_patch(args: argparse.Namespace) -> int:
    from vlmscope.explain.causal import patch_activations
    from vlmscope.images import load_image
    from vlmscope.results import json_safe

    corrupt = load_image(args.corrupt_image)
    vlm, image, out = _prepare(args, "patch")
    result = patch_activations(vlm, image, corrupt, args.prompt, answer=args.answer, layers=args.layers,
                               positions=args.positions, max_new_tokens=args.max_new_tokens)
    clear_owned(out, _owned("patch"))
    written = result.save(out)
    if args.positions == "each":
        written["figure"] = _figure(out / "patch.png", image, result.position_restoration, result.grid.region,
                                    [f"L{layer} restoration" for layer in result.layers], True)
    text = human_stream(args)
    print(f"answer {result.answer!r}: log p clean {result.logprob_clean:.4f}, corrupted "
          f"{result.logprob_corrupt:.4f}", file=text)
    for layer, value in zip(result.layers, result.layer_restoration):
        print(f"  layer {layer}: restoration {value:.3f}", file=text)
    text.flush()
    if args.json:
        emit_json(json_safe({"out": str(out), "answer": result.answer, "logprob_clean": result.logprob_clean,
                             "logprob_corrupt": result.logprob_corrupt, "layers": result.layers,
                             "layer_restoration": result.layer_restoration.tolist(), "files": written}))
    return 0
