"""`vlmscope explain`: per-token attention maps over the image, saved as NPZ + JSON + PNG overlays."""

from __future__ import annotations

import argparse
import fnmatch

from vlmscope.cli._common import (
    add_json_arg,
    check_device,
    check_out_dir,
    clear_owned,
    emit_json,
    human_stream,
    min_int,
)

# What `ExplainResult.save` writes; a re-run into the same folder replaces exactly these.
OWNED = ("attention.npz", "run.json", "overlay_*.png", "steps*.png")


def _owned(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in OWNED)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id, local directory or tiny-llava / tiny-llava-next / "
                        "tiny-qwen2-vl")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the checkpoint's)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("explain", help="attention of every generated token to the image (maps + overlays)",
                              description="Greedy-generate an answer and save what each generated token attended "
                              "to in the image, per layer and head: attention.npz, run.json, PNG overlays.")
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question or instruction")
    p.add_argument("--max-new-tokens", type=min_int(1), default=32)
    p.add_argument("--steps", default="all", help="all, or generated-token indices: 0,1,5 or 0-4 (0 = first token)")
    p.add_argument("--layers", default="all", help="all, 14, 0-3 or 10,14")
    p.add_argument("--heads", default="all", help="all, 13,24 or 0-7")
    p.add_argument("--reduce", default="layers,heads",
                   help="axes averaged for the overlays: none, steps, layers, heads, all, or a combination "
                   "such as steps,heads (default layers,heads: one overlay per step)")
    p.add_argument("--reduce-op", default="mean", choices=["mean", "max", "sum"])
    p.add_argument("--scale", default="shared", choices=["shared", "per-map"],
                   help="colour scale shared across all overlays (comparable) or per map")
    p.add_argument("--max-overlays", type=min_int(0), default=256, help="at most this many overlay PNGs")
    p.add_argument("--no-overlays", action="store_true", help="only write attention.npz and run.json")
    p.add_argument("--out", required=True, help="output directory (a re-run replaces the files it wrote)")
    p.add_argument("--html", default=None, metavar="PAGE.html",
                   help="also write the attention explorer page (see `vlmscope explore`)")
    from vlmscope.cli.explore_cmd import add_page_args

    add_page_args(p)
    add_json_arg(p, "print a JSON summary (generated text, map shape, files) on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import vlmscope
    from vlmscope.explain.maps import explain
    from vlmscope.explain.select import check_range, parse_indices, parse_reduce
    from vlmscope.images import load_image
    from vlmscope.results import check_output_dir

    # Cheap checks before loading a model, so a typo fails in a second.
    check_output_dir(args.out, "explain")
    layers = parse_indices(args.layers, "layer")
    heads = parse_indices(args.heads, "head")
    parse_indices(args.steps, "step")
    parse_reduce(args.reduce)
    image = load_image(args.image)
    if args.html is not None:
        from vlmscope.explain.explorer import check_page_path, parse_head_pairs

        check_page_path(args.html)
        parse_head_pairs(args.localization_heads)
    out = check_out_dir(args.out, _owned, "explain")
    vlm = vlmscope.load(args.model, device=check_device(args.device), dtype=args.dtype)
    check_range(layers, vlm.adapter.num_layers, "layer")
    check_range(heads, vlm.adapter.num_heads, "head")
    result = explain(vlm, image, args.prompt, steps=args.steps, layers=layers or "all",
                     heads=heads or "all", reduce=args.reduce, reduce_op=args.reduce_op, scale=args.scale,
                     max_new_tokens=args.max_new_tokens)
    page = None
    if args.html is not None:  # first: a page over its size budget is refused before anything is written
        from vlmscope.cli.explore_cmd import write_page

        page = write_page(result, args, args.html)["path"]
    clear_owned(out, _owned)
    written = result.save(out, overlays=not args.no_overlays, max_overlays=args.max_overlays)
    if page is not None:
        written["html"] = page
    text = human_stream(args)
    print(f"generated: {result.text!r}", file=text)
    print(f"maps {list(result.maps.shape)} (steps, layers, heads, grid_h, grid_w) → {written['npz']}", file=text)
    print(f"{len(written['overlays'])} overlays, {len(written['figures'])} step figure(s) in {out}", file=text)
    text.flush()
    if args.json:
        emit_json({"text": result.text, "maps_shape": list(result.maps.shape), "out": str(out), "files": written})
    return 0
