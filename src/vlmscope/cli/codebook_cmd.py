"""`vlmscope codebook build|info`: construct a redundancy codebook, or describe one."""

from __future__ import annotations

import argparse
from typing import Any

from vlmscope.cli._common import check_device, min_int, print_json_line


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("codebook", help="build or inspect a redundancy codebook (visual-token pruning)")
    sub = parser.add_subparsers(dest="codebook_command", metavar="ACTION", required=True)

    build = sub.add_parser(
        "build", help="find low-information visual tokens over a set of images and cluster them into prototypes",
        description="Build a redundancy codebook (single-token test, local and global leave-one-out, DPC-KNN). "
                    "Resumable: per-image results go to OUT.parts.jsonl and are skipped on restart.",
    )
    build.add_argument("--model", required=True, help="hub id, local directory or built-in tiny model")
    build.add_argument("--images", required=True, help="directory of images (sorted by file name)")
    build.add_argument("--out", required=True, help="codebook file to write (a torch-saved fp16 tensor + .json)")
    build.add_argument("--num-images", type=min_int(1), default=None, help="use the first N images")
    build.add_argument("--preset", default="script", choices=["script", "llava15", "llava-next", "llava-ov"],
                       help="shipped construction settings (default: the reference scripts' defaults)")
    build.add_argument("--top1-prob-thres", type=float)
    build.add_argument("--jsd-value-thres", type=float)
    build.add_argument("--k-context", type=float)
    build.add_argument("--k-global", type=float)
    build.add_argument("--cluster-nums", type=min_int(1), help="per-image DPC-KNN clusters")
    build.add_argument("--cluster-size-thres", type=int, help="largest per-image cluster whose tokens count")
    build.add_argument("--prototype-cluster-nums", type=min_int(1), help="global DPC-KNN clusters")
    build.add_argument("--prototype-min-unique", type=int, dest="prototype_min_unique_sample_thres",
                       help="a global cluster is kept when it draws on more than this many images")
    build.add_argument("--knn", type=min_int(1), help="neighbours for the DPC-KNN density")
    build.add_argument("--divergence", choices=["reference", "jsd"],
                       help="reference: as the reference code computes it (default); jsd: textbook JSD")
    build.add_argument("--prompt", help="the single-word prompt of the probes")
    build.add_argument("--skip-first-token", help="first answer token to skip (default 'A'; 'none' disables)")
    build.add_argument("--pad-token-id", type=int, help="token whose input embedding blanks ablated tokens")
    build.add_argument("--seed", type=int)
    build.add_argument("--batch-size", type=min_int(1), help="probe prompts per forward")
    build.add_argument("--device", default=None)
    build.add_argument("--dtype", default=None, help="float32, float16, bfloat16")
    build.add_argument("--no-progress", action="store_true")
    build.add_argument("--json", action="store_true", help="print a one-line JSON summary")
    build.set_defaults(func=run_build)

    info = sub.add_parser("info", help="shape and provenance of a codebook file")
    info.add_argument("path")
    info.set_defaults(func=run_info)


_SETTING_FLAGS = ("top1_prob_thres", "jsd_value_thres", "k_context", "k_global", "cluster_nums",
                  "cluster_size_thres", "prototype_cluster_nums", "prototype_min_unique_sample_thres", "knn",
                  "divergence", "prompt", "pad_token_id", "seed", "batch_size")


def run_build(args: argparse.Namespace) -> int:
    from vlmscope.api import load
    from vlmscope.codebook.build import BuildSettings, build_codebook, list_images

    overrides = {name: getattr(args, name) for name in _SETTING_FLAGS if getattr(args, name) is not None}
    if args.skip_first_token is not None:
        overrides["skip_first_token"] = None if args.skip_first_token.lower() == "none" else args.skip_first_token
    settings = BuildSettings.preset(args.preset, **overrides)
    list_images(args.images, args.num_images)  # bad input fails before the model loads
    vlm = load(args.model, device=check_device(args.device), dtype=args.dtype)
    result = build_codebook(vlm, args.images, args.out, settings, num_images=args.num_images,
                            progress=not args.no_progress)
    summary = {"out": str(result.path), "prototypes": result.prototypes, "candidates": result.candidates,
               "images": result.images, "analysed_now": len(result.computed)}
    if args.json:
        print_json_line(summary)
    else:
        print(f"wrote {result.path}: {result.prototypes} prototypes from {result.candidates} candidates "
              f"over {result.images} images ({len(result.computed)} analysed now)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from vlmscope.codebook.io import load_codebook

    codebook = load_codebook(args.path)
    meta = codebook.meta
    summary = {"path": codebook.path, "prototypes": codebook.size, "width": codebook.width,
               "dtype": str(codebook.prototypes.dtype).replace("torch.", ""), "model": meta.get("model")}
    entries = meta.get("prototypes") or meta.get("sources") or []
    images = {e["image"] if isinstance(e, dict) else e for e in entries}
    if images:
        summary["source_images"] = len(images)
    print_json_line(summary)
    return 0
