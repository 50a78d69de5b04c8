"""`vlmscope eval chair|pope`: resumable, batched, sharded evaluation runs on COCO-2014."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

from vlmscope.cli._common import add_method_args
from vlmscope.errors import InputError


def register(sub: Any) -> None:
    parser = sub.add_parser("eval", help="run CHAIR captioning or POPE answering on COCO-2014 images")
    parser.add_argument("task", choices=["chair", "pope"])
    parser.add_argument("--config", default=None, help="eval_configs/X.yaml")
    parser.add_argument("--model", default=None, help="overrides the config's model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--data-path", required=True, help="directory holding COCO_val2014_*.jpg images")
    parser.add_argument("--out", required=True, help="run directory (results, metrics.json, metrics.md)")
    parser.add_argument("--questions", nargs="+", default=None,
                        help="POPE question file(s) (JSON lines); several splits are scored side by side")
    parser.add_argument("--rule", default=None, help="POPE answer-parsing rule (default: official)")
    parser.add_argument("--gt-objects", default=None, help="CHAIR ground truth: {image_id: [objects]} JSON or "
                        "a COCO annotation directory (default: the shipped COCO-2014 cache)")
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--image-ids", default=None, help="file with one image id per line")
    parser.add_argument("--listing", choices=["sorted", "listdir"], default="sorted",
                        help="image order before the seeded shuffle (listdir reproduces a seed run on its machine)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--prompt", default=None, help="CHAIR prompt (default: the config's)")
    parser.add_argument("--protocol", default=None,
                        help="frozen protocol: chair opera-500 / opera-500-64 (images, prompt, tokens); pope pope-coco, "
                        "pope-random|popular|adversarial (the shipped 3,000-question splits unless --questions), "
                        "pope-random-llava-2910 (pass its file with --questions); recorded in metrics.json")
    parser.add_argument("--normaliser", choices=("auto", "nltk", "builtin"), default="auto",
                        help="CHAIR text normaliser (default auto: NLTK when its data are installed)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="DRAWS",
                        help="bootstrap draws for the 95%% intervals, images resampled (default 1000; 0: none)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    add_method_args(parser)
    parser.set_defaults(func=run, decoding=None)


def run(args: argparse.Namespace) -> int:
    import vlmscope
    from vlmscope.decoding import DECODINGS
    from vlmscope.eval.model_eval import current_shard, load_config, resolve_method
    from vlmscope.interventions import INTERVENTIONS

    config = load_config(args.config)
    model = args.model or config.model
    shard = current_shard()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decoding = resolve_method(args.decoding or config.decoding, config.methods, DECODINGS)
    interventions = [resolve_method(s, config.methods, INTERVENTIONS)
                     for s in (args.intervention or config.interventions)]
    batch_size = args.batch_size or config.batch_size
    settings = {"model": model, "decoding": repr(decoding), "interventions": [repr(i) for i in interventions],
                "batch_size": batch_size}
    protocol = _protocol(args)
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    scoring = {"bootstrap": args.bootstrap, "bootstrap_seed": args.bootstrap_seed}
    settings["protocol"] = protocol.record() if protocol is not None else None
    # Inputs are checked before the model loads: a typo should not cost a checkpoint load.
    if args.task == "chair":
        from vlmscope.eval.coco import coco_items

        opts = config.chair
        if protocol is not None:
            items = _protocol_items(protocol, args)
            prompt, max_new = protocol.prompt, protocol.max_new_tokens
            scoring["truncate_incomplete"] = protocol.truncate_incomplete
        else:
            items = coco_items(args.data_path, args.num_images or opts.get("num_images"),
                               args.seed if args.seed is not None else opts.get("seed"), args.image_ids, args.listing)
            prompt = args.prompt or opts.get("prompt", "Please describe this image in detail.")
            max_new = args.max_new_tokens or opts.get("max_new_tokens", 512)
        if not items:
            raise InputError(f"no images to caption in {args.data_path}; check --data-path and --num-images")
        scoring["normaliser"] = args.normaliser
        settings.update(prompt=prompt, max_new_tokens=max_new, num_images=len(items))
    else:
        opts = config.pope
        if protocol is not None and not args.questions:
            from vlmscope.eval.protocols import bundled_pope_file

            if protocol.fingerprints:
                args.questions = [str(bundled_pope_file(s)) for s in protocol.splits]
        questions = _pope_questions(args.questions, args.data_path)
        if protocol is not None:
            from vlmscope.eval.protocols import check_pope_questions

            by_split: dict[str, list] = {}
            for q in questions:
                by_split.setdefault(q["split"], []).append(q)
            check_pope_questions(protocol, by_split)
        max_new = args.max_new_tokens or opts.get("max_new_tokens", 16)
        rule = args.rule or opts.get("rule", "official")
        settings.update(questions=[str(q) for q in args.questions], max_new_tokens=max_new, rule=rule)
    vlm = vlmscope.load(model, device=args.device or shard.device or config.device, dtype=args.dtype or config.dtype)
    if args.task == "chair":
        _run_chair(vlm, shard, out, items, prompt, max_new, decoding, interventions, batch_size,
                   args.gt_objects, settings, scoring)
    else:
        _run_pope(vlm, shard, out, questions, args.data_path, opts.get("prompt_suffix", ""), max_new, rule,
                  decoding, interventions, batch_size, settings, scoring)
    return 0


def _protocol(args: argparse.Namespace) -> Any:
    if args.protocol is None:
        return None
    from vlmscope.eval.protocols import get_protocol

    protocol = get_protocol(args.protocol, args.task)
    # A protocol fixes these; silently overriding one would mislabel the run.
    fixed = {"chair": ("prompt", "max_new_tokens", "num_images", "image_ids", "seed"), "pope": ()}[args.task]
    given = [f"--{name.replace('_', '-')}" for name in fixed if getattr(args, name) is not None]
    if given:
        raise InputError(f"--protocol {protocol.name} fixes {', '.join(given)}; drop them or run without --protocol")
    return protocol


def _protocol_items(protocol: Any, args: argparse.Namespace) -> list[tuple[int, str]]:
    from vlmscope.eval.coco import coco_items

    ids_file = resources.files("vlmscope").joinpath("data", protocol.image_ids_file)
    with resources.as_file(ids_file) as path:
        return coco_items(args.data_path, None, None, path, args.listing)


def _pope_questions(files: list[str] | None, data_path: str) -> list[dict[str, Any]]:
    from vlmscope.eval.pope import load_questions

    if not files:
        raise InputError("POPE needs --questions F.jsonl (e.g. the shipped coco_pope_random.jsonl)")
    root = Path(data_path)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}; pass the COCO val2014 folder as --data-path")
    questions = [q for f in files for q in load_questions(f)]
    missing = sorted({q["image"] for q in questions if not (root / q["image"]).is_file()})
    if missing:
        raise InputError(f"{len(missing)} POPE images are not in {root} (first: {missing[0]}); check --data-path")
    return questions


def _shard_path(out: Path, name: str, shard: Any) -> Path:
    # One file per process: appends from several processes never interleave; the main process merges.
    return out / name if shard.world_size == 1 else out / "shards" / f"{name}.rank{shard.rank}"


def _todo(items: list[Any], key: Any, shard: Any, final: Any) -> list[Any]:
    from vlmscope.eval.store import shard as take_shard

    # Rows merged into the final file by an earlier (differently sharded) run count as done.
    return [it for it in take_shard(items, shard.rank, shard.world_size) if key(it) not in final]


def _merge(out: Path, name: str, key: str, order: list[Any], shard: Any) -> None:
    from vlmscope.eval.store import merge_shards

    if shard.world_size > 1:
        final = out / name
        parts = ([final] if final.exists() else []) + sorted((out / "shards").glob(f"{name}.rank*"))
        merge_shards(parts, final, key, order=order)


def _run_chair(vlm, shard, out, items, prompt, max_new, decoding, interventions, batch_size, gt_source,
               settings, scoring) -> None:
    from vlmscope.eval.model_eval import caption_fn
    from vlmscope.eval.runner import caption_images, score_chair
    from vlmscope.eval.store import ResultStore

    final = ResultStore(out / "captions.jsonl", "image_id")
    todo = _todo(items, lambda it: it[0], shard, final)
    store = final if shard.world_size == 1 else ResultStore(_shard_path(out, "captions.jsonl", shard), "image_id")
    caption_images(todo, caption_fn(vlm, prompt, max_new, decoding, interventions), store, batch_size,
                   desc=f"captions[{shard.rank}]")
    shard.wait()
    if not shard.is_main:
        return
    ids = [i for i, _ in items]
    _merge(out, "captions.jsonl", "image_id", ids, shard)
    payload = score_chair(ids, out / "captions.jsonl", gt_source, out, settings, **scoring)
    print((out / "metrics.md").read_text(), end="")
    print(f"CHAIR_S {payload['metrics']['CHAIR_S']:.1f}  CHAIR_I {payload['metrics']['CHAIR_I']:.1f}  → {out}")


def _run_pope(vlm, shard, out, questions, data_path, suffix, max_new, rule, decoding, interventions, batch_size,
              settings, scoring) -> None:
    from vlmscope.eval.model_eval import answer_fn
    from vlmscope.eval.runner import answer_questions, question_key, score_pope
    from vlmscope.eval.store import ResultStore

    final = ResultStore(out / "answers.jsonl", "qkey")
    todo = _todo(questions, question_key, shard, final)
    store = final if shard.world_size == 1 else ResultStore(_shard_path(out, "answers.jsonl", shard), "qkey")
    answer_questions(todo, answer_fn(vlm, suffix, max_new, decoding, interventions), store, batch_size,
                     image_root=data_path, desc=f"answers[{shard.rank}]")
    shard.wait()
    if not shard.is_main:
        return
    _merge(out, "answers.jsonl", "qkey", [question_key(q) for q in questions], shard)
    score_pope(questions, out / "answers.jsonl", rule, out, settings, **scoring)
    print((out / "metrics.md").read_text(), end="")
