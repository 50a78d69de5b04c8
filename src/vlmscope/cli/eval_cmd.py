"""`vlmscope eval chair|pope|amber`: resumable, batched, sharded evaluation runs (COCO-2014; AMBER).

Everything that determines the numbers goes into one settings dict (`_settings_chair` / `_settings_pope`),
which binds the run folder (`vlmscope.eval.runs`): add a new setting there. All inputs are checked before
the model loads and before the folder is created, so a typo costs neither a checkpoint load nor a folder.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from vlmscope.cli._common import add_json_arg, add_method_args, check_device, emit_json, min_int
from vlmscope.errors import InputError


def register(sub: Any) -> None:
    parser = sub.add_parser("eval", help="run CHAIR captioning or POPE answering on COCO-2014 images (POPE also "
                            "on A-OKVQA and GQA), or AMBER")
    parser.add_argument("task", choices=["chair", "pope", "amber"])
    parser.add_argument("--config", default=None, help="eval_configs/X.yaml")
    parser.add_argument("--model", default=None, help="overrides the config's model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the config's)")
    parser.add_argument("--data-path", required=True, action="append",
                        help="directory holding COCO_val2014_*.jpg images (AMBER: the AMBER_<id>.jpg images); POPE: "
                        "one folder for every dataset of the run, or DATASET=DIR (repeatable: aokvqa=COCO_VAL2014, "
                        "gqa=GQA_IMAGES) per dataset")
    parser.add_argument("--out", required=True, help="run directory (results, run.json, metrics.json, metrics.md)")
    parser.add_argument("--force-new", action="store_true",
                        help="discard the results stored in --out and start over (default: resume them)")
    parser.add_argument("--questions", nargs="+", default=None,
                        help="POPE question file(s) (JSON lines or array) or shipped sets by name: coco-random, "
                        "aokvqa-popular, gqa-adversarial, ..., or coco / aokvqa / gqa (three splits each); several "
                        "splits are scored side by side")
    parser.add_argument("--rule", default=None, help="POPE answer-parsing rule (default: official)")
    parser.add_argument("--gt-objects", default=None, help="CHAIR ground truth: {image_id: [objects]} JSON or "
                        "a COCO annotation directory (default: the shipped COCO-2014 cache)")
    parser.add_argument("--num-images", type=min_int(1), default=None, help="images to caption (default: config)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--image-ids", default=None, help="file with one image id per line")
    parser.add_argument("--listing", choices=["sorted", "listdir"], default="sorted",
                        help="image order before the seeded shuffle (listdir reproduces a seed run on its machine)")
    parser.add_argument("--batch-size", type=min_int(1), default=None)
    parser.add_argument("--max-new-tokens", type=min_int(1), default=None)
    parser.add_argument("--prompt", default=None, help="CHAIR prompt (default: the config's)")
    parser.add_argument("--protocol", default=None,
                        help="frozen protocol: chair opera-500 / opera-500-64 (images, prompt, tokens); pope pope-coco, "
                        "pope-random|popular|adversarial (the shipped 3,000-question splits unless --questions), "
                        "pope-aokvqa[-SPLIT], pope-gqa[-SPLIT] (A-OKVQA / GQA, shipped), "
                        "pope-random-llava-2910 (pass its file with --questions); recorded in metrics.json")
    parser.add_argument("--normaliser", choices=("auto", "nltk", "builtin"), default="auto",
                        help="CHAIR text normaliser (default auto: NLTK when its data are installed)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="DRAWS",
                        help="bootstrap draws for the 95%% intervals, images resampled (default 1000; 0: none)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    _add_amber_args(parser)
    add_method_args(parser)
    add_json_arg(parser, "print the run's metrics and settings as one JSON object (progress and tables to stderr)")
    parser.set_defaults(func=run, decoding=None)


def _pick(cli_value: Any, config_value: Any, default: Any = None) -> Any:
    """The CLI value if given, else the config's, else `default` (0 and "" are values, not absent)."""
    if cli_value is not None:
        return cli_value
    return default if config_value is None else config_value


def run(args: argparse.Namespace) -> int:
    import vlmscope
    from vlmscope.decoding import DECODINGS
    from vlmscope.eval.config import load_config
    from vlmscope.eval.model_eval import answer_fn, caption_fn, current_shard, resolve_method
    from vlmscope.eval.runs import RunFolder, run_chair_folder, run_pope_folder
    from vlmscope.interventions import INTERVENTIONS
    from vlmscope.provenance import provenance
    from vlmscope.registry import spec_string

    if args.task != "pope":  # POPE alone takes a folder per dataset
        args.data_path = _single_data_path(args.data_path, args.task)
    if args.task == "amber":
        _check_amber_args(args)
    elif any(getattr(args, name) is not None for name in AMBER_ONLY):
        given = next(name for name in AMBER_ONLY if getattr(args, name) is not None)
        raise InputError(f"--{given.replace('_', '-')} is an AMBER option; drop it for eval {args.task}")
    config = load_config(args.config)
    decoding = resolve_method(_pick(args.decoding, config.decoding), config.methods, DECODINGS)
    interventions = [resolve_method(s, config.methods, INTERVENTIONS)
                     for s in (args.intervention or config.interventions)]
    device = check_device(args.device or config.device)
    common = {"model": _pick(args.model, config.model), "revision": None, "dtype": _pick(args.dtype, config.dtype),
              "decoding": spec_string(decoding), "interventions": [spec_string(i) for i in interventions],
              "batch_size": _pick(args.batch_size, config.batch_size, 8)}
    protocol = _protocol(args) if args.task != "amber" else None
    if args.bootstrap < 0:
        raise InputError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    common["protocol"] = protocol.record() if protocol is not None else None
    # Scoring-only settings (vlmscope.eval.runs.RESCORED_KEYS): a resume may change them and rescore.
    common.update(bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    if args.task == "chair":
        settings, items = _settings_chair(args, config, common, protocol)
        folder = RunFolder(Path(args.out), "eval-chair", settings)
    elif args.task == "amber":
        settings, queries = _settings_amber(args, common)
        folder = RunFolder(Path(args.out), "eval-amber", settings)
    else:
        settings, questions = _settings_pope(args, config, common, protocol)
        folder = RunFolder(Path(args.out), "eval-pope", settings)
    # Cheap refusal first; the revision and the loaded dtype are known once the model is loaded.
    folder.check(args.force_new, ignore=("revision", "dtype"))
    shard = current_shard()
    vlm = vlmscope.load(settings["model"], device=shard.device or device, dtype=settings["dtype"])
    settings["revision"] = getattr(vlm.model.config, "_commit_hash", None)
    settings["dtype"] = str(vlm.dtype).replace("torch.", "")
    folder.check(args.force_new)
    record = provenance(model_id=vlm.model_id, revision=settings["revision"], decoding=decoding,
                        interventions=interventions, seed=settings.get("seed"), device=vlm.device, dtype=vlm.dtype)
    out = sys.stderr if args.json else sys.stdout
    if args.task == "chair":
        fn = caption_fn(vlm, settings["prompt"], settings["max_new_tokens"], decoding, interventions)
        report = run_chair_folder(folder, items, fn, shard, settings["batch_size"], record,
                                  gt_objects=args.gt_objects, force_new=args.force_new,
                                  bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
                                  normaliser=args.normaliser,
                                  truncate_incomplete=bool(protocol and protocol.truncate_incomplete))
    elif args.task == "amber":
        from vlmscope.eval.runs import run_amber_folder

        fns = {"generative": answer_fn(vlm, "", settings["max_new_tokens"], decoding, interventions),
               "discriminative": answer_fn(vlm, settings["discriminative_suffix"],
                                           settings["max_new_tokens_discriminative"], decoding, interventions)}
        report = run_amber_folder(folder, queries, fns, shard, settings["batch_size"], record,
                                  image_root=args.data_path, task=settings["amber_task"],
                                  parser=settings["amber_parser"], similarity=settings["amber_similarity"],
                                  bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
                                  force_new=args.force_new)
    else:
        fn = answer_fn(vlm, settings["prompt_suffix"], settings["max_new_tokens"], decoding, interventions)
        report = run_pope_folder(folder, questions, fn, shard, settings["batch_size"], record,
                                 image_root=args.image_folders, rule=settings["rule"], force_new=args.force_new,
                                 bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    if report.payload is None:  # not the main process: the main one scores and prints
        return 0
    print((folder.path / "metrics.md").read_text(encoding="utf-8"), end="", file=out)
    metrics = report.payload["metrics"]
    if args.task == "chair":
        print(f"CHAIR_S {metrics['CHAIR_S']:.1f}  CHAIR_I {metrics['CHAIR_I']:.1f}  → {folder.path}", file=out)
    elif args.task == "amber":
        from vlmscope.eval.amber import summary_line

        print(f"{summary_line(report.payload['scoring'], metrics)}  → {folder.path}", file=out)
    print(f"{report.reused} stored rows reused, {report.computed} computed", file=out)
    if args.json:
        payload = {"kind": folder.kind, "out": str(folder.path), "metrics": metrics,
                   "splits": report.payload.get("splits"), "n_items": report.payload["n_items"],
                   "reused": report.reused, "computed": report.computed, "settings": folder.settings}
        if "scoring" in report.payload:  # AMBER: how it was scored (parser, similarity step run or skipped)
            payload["scoring"] = report.payload["scoring"]
        emit_json(payload)
    return 0


def _settings_chair(args: argparse.Namespace, config: Any, common: dict[str, Any], protocol: Any
                    ) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    from vlmscope.eval.coco import coco_items
    from vlmscope.eval.runs import ids_digest

    opts = config.chair
    if args.gt_objects is not None and not Path(args.gt_objects).exists():
        raise InputError(f"ground truth not found: {args.gt_objects}; pass a JSON file or a COCO annotation folder")
    num_images = _pick(args.num_images, opts.get("num_images"))
    seed = _pick(args.seed, opts.get("seed"))
    if protocol is not None:  # the protocol fixes the images, prompt and token limit (`_protocol` refuses others)
        items = _protocol_items(protocol, args)
    else:
        items = coco_items(args.data_path, num_images, seed, args.image_ids, args.listing)
    if not items:
        raise InputError(f"no images to caption in {args.data_path}; check --data-path and --num-images")
    settings = {
        **common,
        "prompt": protocol.prompt if protocol is not None else
        _pick(args.prompt, opts.get("prompt"), "Please describe this image in detail."),
        "max_new_tokens": protocol.max_new_tokens if protocol is not None else
        _pick(args.max_new_tokens, opts.get("max_new_tokens"), 512),
        "data_path": str(Path(args.data_path).resolve()),
        "image_ids_file": None if args.image_ids is None else str(Path(args.image_ids).resolve()),
        "listing": args.listing,
        "seed": seed,
        "num_images": len(items),
        "images": ids_digest([i for i, _ in items]),
        "gt_objects": args.gt_objects or "builtin",
        "normaliser": args.normaliser,
    }
    return settings, items


def _settings_pope(args: argparse.Namespace, config: Any, common: dict[str, Any], protocol: Any
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from vlmscope.eval.pope import RULES, image_folders, question_file_info, question_set_files
    from vlmscope.eval.runner import question_key
    from vlmscope.eval.runs import ids_digest

    opts = config.pope
    rule = _pick(args.rule, opts.get("rule"), "official")
    if rule not in RULES:
        raise InputError(f"unknown POPE rule {rule!r}; use one of {', '.join(sorted(RULES))}")
    if protocol is not None and not args.questions and protocol.fingerprints:
        from vlmscope.eval.protocols import bundled_pope_file

        args.questions = [str(bundled_pope_file(s.removeprefix(f"{protocol.dataset}-"), protocol.dataset))
                          for s in protocol.splits]
    questions = _pope_questions(args.questions)
    if protocol is not None:
        from vlmscope.eval.protocols import check_pope_questions

        by_split: dict[str, list] = {}
        for q in questions:
            by_split.setdefault(q["split"], []).append(q)
        check_pope_questions(protocol, by_split)
    folders = image_folders(args.data_path, questions)
    # One folder for the whole run: passed as it always was; otherwise one per dataset.
    args.image_folders = next(iter(folders.values())) if len(set(folders.values())) == 1 else folders
    files = [question_file_info(f) for f in question_set_files(args.questions)]
    if isinstance(args.image_folders, Path):
        data_path: Any = str(args.image_folders.resolve())
    else:
        data_path = {d or "unnamed": str(p.resolve()) for d, p in folders.items()}
    settings = {
        **common,
        "prompt_suffix": _pick(None, opts.get("prompt_suffix"), ""),
        "max_new_tokens": _pick(args.max_new_tokens, opts.get("max_new_tokens"), 16),
        "data_path": data_path,
        "questions": [{"path": str(Path(f["path"]).resolve()), "sha256": f["sha256"], "lines": f["lines"]}
                      for f in files],
        "num_questions": len(questions),
        "question_keys": ids_digest([question_key(q) for q in questions]),
        "rule": rule,
    }
    return settings, questions


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


def _single_data_path(values: list[str], task: str) -> str:
    if len(values) != 1 or ("=" in values[0] and not Path(values[0]).is_dir()):
        raise InputError(f"{task} takes one --data-path folder (DATASET=DIR is for POPE); give one folder")
    return values[0]


def _pope_questions(specs: list[str] | None) -> list[dict[str, Any]]:
    from vlmscope.eval.pope import load_question_sets

    if not specs:
        raise InputError("POPE needs --questions: a shipped set (coco-random, aokvqa, gqa-popular, ...) or a file")
    questions = load_question_sets(specs)
    if not questions:
        raise InputError(f"no questions in {', '.join(specs)}; pass POPE question files with one question a line")
    return questions


# ---------------------------------------------------------------------------------------------------------
# AMBER (vlmscope.eval.amber): the official queries on the user's AMBER_<id>.jpg images.

AMBER_ONLY = ("amber_task", "amber_parser", "amber_similarity", "amber_suffix")
# Options of the COCO tasks that AMBER does not take (its queries and prompts are the official ones).
NOT_AMBER = ("questions", "rule", "gt_objects", "image_ids", "prompt", "protocol", "seed")


def _add_amber_args(parser: argparse.ArgumentParser) -> None:
    from vlmscope.eval.amber import PARSERS, TASKS

    parser.add_argument("--amber-task", choices=TASKS, default=None,
                        help="AMBER: the queries to run (default all: descriptions and yes/no questions)")
    parser.add_argument("--amber-parser", choices=tuple(PARSERS), default=None,
                        help="AMBER yes/no parsing: reference (exact 'Yes'/'No', default), lenient (substring "
                        "yes, then no, as lmms-eval), halva ('yes' substring, else No); rescoring only")
    parser.add_argument("--amber-similarity", default=None, metavar="auto|spacy|skip|TABLE.json",
                        help="AMBER word-similarity step: auto (spaCy en_core_web_lg if installed, else skipped and "
                        "recorded, default), spacy (required), skip, or a JSON table of [word1, word2, similarity]; "
                        "rescoring only")
    parser.add_argument("--amber-suffix", default=None, metavar="TEXT",
                        help="AMBER: text appended to every yes/no question as written, e.g. ' Answer the question "
                        "using a single word or phrase.' (default none: the official queries)")


def _check_amber_args(args: argparse.Namespace) -> None:
    given = [name for name in NOT_AMBER if getattr(args, name) is not None]
    if given:
        raise InputError(f"--{given[0].replace('_', '-')} does not apply to eval amber (its queries are the "
                         "official ones); drop it")


def _settings_amber(args: argparse.Namespace, common: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from vlmscope.eval.amber import check_images, check_scoring, select_queries
    from vlmscope.eval.runs import ids_digest

    task = args.amber_task or "all"
    similarity = args.amber_similarity or "auto"
    if similarity not in ("auto", "spacy", "skip"):
        similarity = str(Path(similarity).resolve())
    queries = select_queries(task, args.num_images)
    check_images(queries, args.data_path)
    check_scoring(queries, similarity)
    bound = {k: v for k, v in common.items() if k != "protocol"}  # AMBER has no frozen protocols
    settings = {
        **bound,
        "amber_task": task,
        "discriminative_suffix": args.amber_suffix or "",
        "max_new_tokens": _pick(args.max_new_tokens, None, 512),
        "max_new_tokens_discriminative": _pick(args.max_new_tokens, None, 16),
        "data_path": str(Path(args.data_path).resolve()),
        "num_images": len({q["image"] for q in queries}),
        "num_queries": len(queries),
        "query_ids": ids_digest([q["id"] for q in queries]),
        "amber_parser": args.amber_parser or "reference",
        "amber_similarity": similarity,
    }
    return settings, queries
