"""`vlmscope eval chair|pope`: resumable, batched, sharded evaluation runs on COCO-2014."""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

from vlmscope.cli._common import add_method_args
from vlmscope.errors import InputError

COCO_NAME = re.compile(r"COCO_val2014_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


def register(sub: Any) -> None:
    parser = sub.add_parser("eval", help="run CHAIR captioning or POPE answering on COCO-2014 images")
    parser.add_argument("task", choices=["chair", "pope"])
    parser.add_argument("--config", default=None, help="eval_configs/X.yaml")
    parser.add_argument("--model", default=None, help="overrides the config's model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--data-path", required=True, help="directory holding COCO_val2014_*.jpg images")
    parser.add_argument("--out", required=True, help="run directory (results, metrics.json, metrics.md)")
    parser.add_argument("--questions", default=None, help="POPE question file (JSON lines)")
    parser.add_argument("--gt-objects", default=None, help="CHAIR ground truth: {image_id: [objects]} JSON or "
                        "a COCO annotation directory (default: the shipped COCO-2014 cache)")
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--image-ids", default=None, help="file with one image id per line")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--prompt", default=None, help="CHAIR prompt (default: the config's)")
    add_method_args(parser)
    parser.set_defaults(func=run, decoding=None)


def coco_images(data_path: str | Path) -> dict[int, Path]:
    root = Path(data_path)
    if not root.is_dir():
        raise InputError(f"COCO image directory not found: {root} (pass --data-path DIR with val2014 images)")
    found = {}
    for path in sorted(root.iterdir()):
        match = COCO_NAME.search(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise InputError(f"no COCO_val2014_*.jpg images in {root}")
    return found


def select_images(images: dict[int, Path], num: int | None, seed: int | None, ids_file: str | None) -> list[int]:
    """The seed repositories' rule: shuffle the sorted listing with `random.seed(seed)`, take the first N."""
    if ids_file:
        path = Path(ids_file)
        if not path.is_file():
            raise InputError(f"image-id file not found: {path}")
        wanted = [int(line.strip()) for line in path.read_text().splitlines() if line.strip()]
        missing = [i for i in wanted if i not in images]
        if missing:
            raise InputError(f"{len(missing)} listed image ids have no image in the data path (first: {missing[0]})")
        return wanted
    ids = sorted(images)
    random.Random(seed).shuffle(ids) if seed is not None else None
    return ids[:num] if num else ids


def run(args: argparse.Namespace) -> int:
    from vlmscope.eval.model_eval import current_shard, load_config, resolve_method

    config = load_config(args.config)
    model = args.model or config.model
    shard = current_shard()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import vlmscope
    from vlmscope.decoding import DECODINGS
    from vlmscope.interventions import INTERVENTIONS

    decoding = resolve_method(args.decoding or config.decoding, config.methods, DECODINGS)
    interventions = [resolve_method(s, config.methods, INTERVENTIONS)
                     for s in (args.intervention or config.interventions)]
    batch_size = args.batch_size or config.batch_size
    images = coco_images(args.data_path)
    vlm = vlmscope.load(model, device=args.device or shard.device or config.device, dtype=args.dtype or config.dtype)
    settings = {"model": model, "decoding": repr(decoding), "interventions": [repr(i) for i in interventions],
                "batch_size": batch_size}
    if args.task == "chair":
        opts = config.chair
        ids = select_images(images, args.num_images or opts.get("num_images"),
                            args.seed if args.seed is not None else opts.get("seed"), args.image_ids)
        prompt = args.prompt or opts.get("prompt", "Please describe this image in detail.")
        max_new = args.max_new_tokens or opts.get("max_new_tokens", 512)
        settings.update(prompt=prompt, max_new_tokens=max_new, num_images=len(ids))
        _run_chair(vlm, shard, out, ids, images, prompt, max_new, decoding, interventions, batch_size,
                   args.gt_objects, settings)
    else:
        opts = config.pope
        if not args.questions:
            raise InputError("POPE needs --questions F.jsonl (e.g. coco_pope_random.jsonl)")
        max_new = args.max_new_tokens or opts.get("max_new_tokens", 16)
        settings.update(questions=args.questions, max_new_tokens=max_new)
        _run_pope(vlm, shard, out, images, args.questions, opts.get("prompt_suffix", ""), max_new, decoding,
                  interventions, batch_size, settings)
    return 0


def _batches(items: list[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _shard_path(out: Path, name: str, shard: Any) -> Path:
    return out / name if shard.world_size == 1 else out / "shards" / f"{name}.rank{shard.rank}"


def _run_items(todo: list[Any], batch_size: int, store: Any, produce: Any, desc: str) -> None:
    from tqdm import tqdm

    with tqdm(total=len(todo), desc=desc, unit="item") as bar:
        for chunk in _batches(todo, batch_size):
            store.append(produce(chunk))
            bar.update(len(chunk))


def _run_chair(vlm, shard, out, ids, images, prompt, max_new, decoding, interventions, batch_size, gt_source,
               settings) -> None:
    from vlmscope.eval.model_eval import caption_fn
    from vlmscope.eval.results import JsonlResults, merge
    from vlmscope.eval.results import shard as take_shard

    store = JsonlResults(_shard_path(out, "captions.jsonl", shard), "image_id")
    final = JsonlResults(out / "captions.jsonl", "image_id")
    done = store.done() | final.done()
    todo = [i for i in take_shard(ids, shard.rank, shard.world_size) if i not in done]
    caption = caption_fn(vlm, prompt, max_new, decoding, interventions)

    def produce(chunk: list[int]) -> list[dict[str, Any]]:
        texts = caption([str(images[i]) for i in chunk])
        return [{"image_id": i, "caption": t} for i, t in zip(chunk, texts)]

    _run_items(todo, batch_size, store, produce, f"captions[{shard.rank}]")
    shard.wait()
    if not shard.is_main:
        return
    if shard.world_size > 1:
        merge(sorted((out / "shards").glob("captions.jsonl.rank*")), out / "captions.jsonl", "image_id")
    from vlmscope.eval.chair import chair_scores, load_gt_objects

    rows = [r for r in JsonlResults(out / "captions.jsonl", "image_id").rows() if r["image_id"] in set(ids)]
    gt = load_gt_objects(gt_source, image_ids=[r["image_id"] for r in rows])
    result = chair_scores(rows, gt)
    _write_metrics(out, {"task": "chair", **settings}, result.metrics)
    (out / "chair_details.json").write_text(json.dumps(result.to_dict(), indent=1))


def _run_pope(vlm, shard, out, images, questions_file, suffix, max_new, decoding, interventions, batch_size,
              settings) -> None:
    from vlmscope.eval.model_eval import answer_fn
    from vlmscope.eval.pope import load_questions, pope_scores
    from vlmscope.eval.results import JsonlResults, merge
    from vlmscope.eval.results import shard as take_shard

    questions = load_questions(questions_file)
    by_name = {p.name: p for p in images.values()}
    missing = [q for q in questions if Path(q["image"]).name not in by_name]
    if missing:
        raise InputError(f"{len(missing)} POPE images are not in the data path (first: {missing[0]['image']})")
    store = JsonlResults(_shard_path(out, "answers.jsonl", shard), "question_id")
    final = JsonlResults(out / "answers.jsonl", "question_id")
    done = store.done() | final.done()
    todo = [q for q in take_shard(questions, shard.rank, shard.world_size) if q["question_id"] not in done]
    answer = answer_fn(vlm, suffix, max_new, decoding, interventions)

    def produce(chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        texts = answer([(str(by_name[Path(q["image"]).name]), q["text"]) for q in chunk])
        return [{"question_id": q["question_id"], "answer": t} for q, t in zip(chunk, texts)]

    _run_items(todo, batch_size, store, produce, f"answers[{shard.rank}]")
    shard.wait()
    if not shard.is_main:
        return
    if shard.world_size > 1:
        merge(sorted((out / "shards").glob("answers.jsonl.rank*")), out / "answers.jsonl", "question_id")
    answers = list(JsonlResults(out / "answers.jsonl", "question_id").rows())
    metrics = pope_scores(answers, questions)
    _write_metrics(out, {"task": "pope", **settings}, metrics)


def _write_metrics(out: Path, settings: dict[str, Any], metrics: dict[str, Any]) -> None:
    (out / "metrics.json").write_text(json.dumps({"settings": settings, "metrics": metrics}, indent=2))
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):  # POPE: one block of metrics per split
            flat.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, int | float)})
        elif isinstance(value, int | float):
            flat[key] = value
    lines = ["| " + " | ".join(flat) + " |", "|" + "---|" * len(flat),
             "| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in flat.values()) + " |"]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
