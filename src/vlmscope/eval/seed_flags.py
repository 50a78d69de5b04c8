"""Translate the seed repositories' evaluation flags (OPERA / PAI / AAI scripts) to vlmscope method specs."""

from __future__ import annotations

import argparse


def add_seed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llava-1.5", help="llava-1.5 | llava-next | qwen2-vl | qwen2.5-vl | instructblip | minigpt4 | shikra | a model ref")
    parser.add_argument("--data-path", "--data_path", dest="data_path", required=True)
    parser.add_argument("--out", "--output", dest="out", default=None)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--opera", action="store_true", help="OPERA decoding (implied by any OPERA flag)")
    parser.add_argument("--scale_factor", type=float, default=None)
    parser.add_argument("--threshold", type=int, default=None)
    parser.add_argument("--num_attn_candidates", type=int, default=None)
    parser.add_argument("--penalty_weights", type=float, default=None)
    parser.add_argument("--use-aai", "--use_aai", dest="use_aai", action="store_true")
    parser.add_argument("--use-attn", "--use_attn", dest="use_attn", action="store_true")
    parser.add_argument("--use-cfg", "--use_cfg", dest="use_cfg", action="store_true")
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--gamma", type=float, default=2.0)
    parser.add_argument("--start-layer", "--start_layer", dest="start_layer", type=int, default=2)
    parser.add_argument("--end-layer", "--end_layer", dest="end_layer", type=int, default=32)
    parser.add_argument("--max-tokens", "--max_tokens", "--max_new_tokens", dest="max_tokens", type=int, default=None)
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None)
    parser.add_argument("--num-images", dest="num_images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--gpu-id", "--gpu_id", dest="gpu_id", default=None, help="ignored: use CUDA_VISIBLE_DEVICES")


CONFIGS = {"llava-1.5": "eval_configs/llava-1.5.yaml", "llava-next": "eval_configs/llava-next.yaml",
           "qwen2-vl": "eval_configs/qwen2-vl.yaml", "qwen2.5-vl": "eval_configs/qwen2.5-vl.yaml",
           "instructblip": "eval_configs/instructblip.yaml", "minigpt4": "eval_configs/minigpt4.yaml",
           "shikra": "eval_configs/shikra.yaml"}


def method_specs(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(decoding spec, intervention specs) equivalent to the seed scripts' flags."""
    interventions = []
    layers = f"start={args.start_layer},end={args.end_layer}"
    if args.use_aai:
        alpha = 0.3 if args.alpha is None else args.alpha
        beta = 1.0 if args.beta is None else args.beta
        interventions.append(f"aai:alpha={alpha},beta={beta},{layers}")
    elif args.use_attn or args.use_cfg:
        alpha = (0.2 if args.alpha is None else args.alpha) if args.use_attn else 0.0
        # The seed scripts reproduce the reference (tools/parity/pai): its unconditional cache keeps its row order
        # under beam search, and its beam search adds the CFG scores without renormalising them.
        cfg = (f",cfg=true,gamma={args.gamma},cfg_reorder_uncond_cache=false,cfg_beam_raw_scores=true"
               if args.use_cfg else "")
        interventions.append(f"pai:alpha={alpha},{layers}{cfg}")
    opera_values = {"scale_factor": args.scale_factor, "threshold": args.threshold,
                    "num_attn_candidates": args.num_attn_candidates, "penalty_weights": args.penalty_weights}
    if args.opera or any(v is not None for v in opera_values.values()):
        params = ",".join(f"{k}={v}" for k, v in opera_values.items() if v is not None)
        decoding = f"opera:num_beams={args.beam}" + (f",{params}" if params else "")
    elif args.sample:
        decoding = "sample"
    elif args.beam > 1:
        decoding = f"beam:num_beams={args.beam}"
    else:
        decoding = "greedy"
    return decoding, interventions


def eval_argv(task: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    decoding, interventions = method_specs(args)
    argv = ["eval", task, "--data-path", args.data_path, "--decoding", decoding]
    if args.model in CONFIGS:
        argv += ["--config", CONFIGS[args.model]]
    else:
        argv += ["--model", args.model]
    for spec in interventions:
        argv += ["--intervention", spec]
    method = decoding.split(":")[0] + "".join("+" + s.split(":")[0] for s in interventions)
    argv += ["--out", args.out or f"runs/{task}_{args.model.replace('/', '_')}_{method}"]
    for flag, value in (("--max-new-tokens", args.max_tokens), ("--batch-size", args.batch_size),
                        ("--num-images", args.num_images), ("--seed", args.seed)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + extra
