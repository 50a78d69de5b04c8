"""`vlmscope explore`: the attention explorer, one self-contained HTML page (see vlmscope.explain.explorer)."""

from __future__ import annotations

import argparse

from vlmscope.cli._common import add_json_arg, check_device, emit_json, human_stream, min_int


def add_page_args(parser: argparse.ArgumentParser) -> None:
    """Options of the page itself, shared with `explain --html`."""
    parser.add_argument("--localization-heads", default=None, metavar="L:H,...",
                        help="heads offered as the 'localization heads' reduction, e.g. 14:3,15:7")
    parser.add_argument("--max-page-mb", type=min_int(1), default=48,
                        help="refuse a page larger than this many MiB (select fewer layers/heads/steps)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explore", help="attention explorer: one self-contained HTML page (tokens, maps, layer/head pickers)",
        description="Greedy-generate an answer (or read a saved explain result with --result) and write one HTML "
        "page: click or hover a generated token to see its attention over the image, pick layers and heads or "
        "their mean/max, arrows to navigate. No server, no network: everything is embedded.")
    p.add_argument("--model", help="hub id, local directory or built-in name (not with --result)")
    p.add_argument("--result", help="a folder written by `vlmscope explain` (instead of --model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16 (default: the checkpoint's)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", help="question or instruction (with --model)")
    p.add_argument("--max-new-tokens", type=min_int(1), default=32)
    p.add_argument("--steps", default="all", help="all, or generated-token indices: 0,1,5 or 0-4")
    p.add_argument("--layers", default="all", help="all, 14, 0-3 or 10,14 (fewer layers: a smaller page)")
    p.add_argument("--heads", default="all", help="all, 13,24 or 0-7")
    p.add_argument("--scale", default="shared", choices=["shared", "per-map"],
                   help="initial colour scale: shared across tokens or per map (switchable on the page)")
    p.add_argument("--compare", default=None, metavar="DECODING",
                   help="also show another decoding's answer side by side, e.g. opera:num_beams=5 or beam "
                   "(its attention from a teacher-forced pass: decodings that do not edit attention)")
    add_page_args(p)
    p.add_argument("--out", required=True, help="the HTML file to write, e.g. page.html")
    add_json_arg(p, "print a JSON summary (page path, bytes, map shape) on stdout")
    p.set_defaults(func=run)


def write_page(result: object, args: argparse.Namespace, out: object, **kwargs: object) -> dict:
    from vlmscope.explain.explorer import parse_head_pairs, save_explorer

    return save_explorer(result, out, localization_heads=parse_head_pairs(args.localization_heads),
                         scale=getattr(args, "scale", None), max_bytes=args.max_page_mb * 2**20, **kwargs)


def run(args: argparse.Namespace) -> int:
    import vlmscope
    from vlmscope.errors import InputError
    from vlmscope.explain.explorer import check_page_path, parse_head_pairs
    from vlmscope.explain.maps import ExplainResult, explain
    from vlmscope.explain.select import check_range, parse_indices
    from vlmscope.images import load_image

    # Cheap checks before loading a model, so a typo fails in a second.
    if (args.model is None) == (args.result is None):
        raise InputError("give either --model (generate now) or --result (a saved explain folder)")
    if args.model is not None and not args.prompt:
        raise InputError("--model needs --prompt (the question or instruction)")
    out = check_page_path(args.out)
    compare_method = None
    if args.compare is not None:
        from vlmscope.decoding import DECODINGS

        if args.model is None:
            raise InputError("--compare generates another answer: it needs --model (not --result)")
        compare_method = DECODINGS.from_config(args.compare)
    heads_wanted = parse_head_pairs(args.localization_heads)
    image = load_image(args.image)
    if args.result is not None:
        result = ExplainResult.load(args.result, image=image)
    else:
        layers = parse_indices(args.layers, "layer")
        heads = parse_indices(args.heads, "head")
        parse_indices(args.steps, "step")
        vlm = vlmscope.load(args.model, device=check_device(args.device), dtype=args.dtype)
        check_range(layers, vlm.adapter.num_layers, "layer")
        check_range(heads, vlm.adapter.num_heads, "head")
        for layer, head in heads_wanted:
            vlm.adapter.check_layer(layer)
            vlm.adapter.check_head(head)
        result = explain(vlm, image, args.prompt, steps=args.steps, layers=layers or "all",
                         heads=heads or "all", scale=args.scale, max_new_tokens=args.max_new_tokens)
    extra: dict = {}
    if compare_method is not None:
        from vlmscope.explain.explorer import explain_answer
        from vlmscope.registry import spec_string

        other = vlm.generate(image, args.prompt, max_new_tokens=args.max_new_tokens, decoding=compare_method)
        label = spec_string(compare_method)
        extra = {"compare": explain_answer(vlm, image, args.prompt, other.token_ids, layers=result.layers,
                                           heads=result.heads, decoding=label),
                 "labels": ("greedy", label)}
    written = write_page(result, args, out, **extra)
    text = human_stream(args)
    print(f"generated: {result.text!r}", file=text)
    if extra:
        print(f"compared with {extra['labels'][1]}: {extra['compare'].text!r}", file=text)
    print(f"explorer page {written['path']}: {written['bytes'] / 2**20:.2f} MiB, maps {list(result.maps.shape)} "
          "(steps, layers, heads, grid_h, grid_w)", file=text)
    text.flush()
    if args.json:
        emit_json({"text": result.text, "page": written["path"], "bytes": written["bytes"],
                   "maps_shape": list(result.maps.shape),
                   "compare": {"decoding": extra["labels"][1], "text": extra["compare"].text} if extra else None})
    return 0
