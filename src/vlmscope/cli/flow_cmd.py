"""`vlmscope flow`: attention shares, saliency flows and LLaVA-CAM per decoder layer."""

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
    min_float,
    min_int,
)
from vlmscope.cli.explain_cmd import add_model_args

# What `FlowResult.save` writes; a re-run into the same folder replaces exactly these.
OWNED = ("run.json", "flows.png", "cam*.png")


def _owned(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in OWNED)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("flow", help="information flow between prefix/image/instruction/output per layer",
                              description="Teacher-force an answer (greedy-generated when --answer is omitted) "
                              "and write run.json (attention shares, saliency flows, CAMs), flows.png, cam.png.")
    add_model_args(p)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question or instruction")
    p.add_argument("--answer", default=None, help="answer to explain (default: the greedy answer)")
    p.add_argument("--max-new-tokens", type=min_int(1), default=32, help="length limit of the generated answer")
    p.add_argument("--layers", default="all", help="layers to analyse: all, 0-15, 14 or 2,14")
    p.add_argument("--chunk-size", type=min_int(1), default=8,
                   help="layers per forward+backward for the saliency: memory grows with it, passes shrink")
    p.add_argument("--cam", default="described", choices=["described", "coded", "none"],
                   help="LLaVA-CAM variant: the paper's (default), the released script's, or none")
    p.add_argument("--cam-threshold", type=min_float(0.0), default=None,
                   help="zero normalised CAM values below this (the coded variant uses 0.5 by default)")
    p.add_argument("--smooth-samples", type=min_int(0), default=0, help="SmoothGrad copies for the CAM (0 = off)")
    p.add_argument("--smooth-sigma", type=min_float(0.0), default=0.1, help="SmoothGrad noise std on the pixel values")
    p.add_argument("--out", required=True, help="output directory (a re-run replaces the files it wrote)")
    add_json_arg(p, "print a JSON summary (answer, files) on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import vlmscope
    from vlmscope.explain.flow import MAIN_FLOWS, flow
    from vlmscope.explain.select import check_range, parse_indices
    from vlmscope.images import load_image
    from vlmscope.results import check_output_dir

    check_output_dir(args.out, "flow")
    layers = parse_indices(args.layers, "layer")
    image = load_image(args.image)
    out = check_out_dir(args.out, _owned, "flow")
    vlm = vlmscope.load(args.model, device=check_device(args.device), dtype=args.dtype)
    check_range(layers, vlm.adapter.num_layers, "layer")
    result = flow(vlm, image, args.prompt, answer=args.answer, max_new_tokens=args.max_new_tokens,
                  layers=layers or "all", chunk_size=args.chunk_size, cam=None if args.cam == "none" else args.cam,
                  cam_threshold=args.cam_threshold, smooth_samples=args.smooth_samples,
                  smooth_sigma=args.smooth_sigma)
    clear_owned(out, _owned)
    written = result.save(out)
    text = human_stream(args)
    print(f"answer: {result.answer!r} ({len(result.answer_ids)} tokens)", file=text)
    header = "layer  " + "  ".join(f"{g:>11}" for g in result.attention_shares) + "  " + "  ".join(
        f"{k:>19}" for k in MAIN_FLOWS)
    print("attention shares | mean saliency per pair", file=text)
    print(header, file=text)
    for i, layer in enumerate(result.layers):
        shares = "  ".join(f"{v[i]:>11.4f}" for v in result.attention_shares.values())
        flows = "  ".join(f"{result.saliency[k][i]:>19.3e}" for k in MAIN_FLOWS)
        print(f"{layer:>5}  {shares}  {flows}", file=text)
    print(f"wrote {', '.join(written.values())}", file=text)
    text.flush()
    if args.json:
        emit_json({"answer": result.answer, "answer_ids": list(result.answer_ids), "layers": list(result.layers),
                   "out": str(out), "files": written})
    return 0
