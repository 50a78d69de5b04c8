"""POPE answering throughput: batched vs one question at a time, measured side by side in one run.

The whole answering path of `vlmscope eval pope` runs: images read from disk, chat template, left-padded
batch, our decoding loop, one fsync'ed JSON line per answer in a `ResultStore`. Each configuration answers
the same questions at batch size 1 and at the larger batch sizes, interleaved within each repeat; the
fastest repeat is reported (on a shared CPU noise only adds time). The answers must not depend on the batch
size (left padding is exact in our loop), and the script checks that they do not.

Configurations:
- tiny: the offline tiny LLaVA (16 image tokens, 4 layers);
- small: a random LLaVA with LLaVA-1.5's 576 image tokens (336 px, patch 14) and an 8-layer, 256-wide
  language model.

    python benchmarks/bench_pope.py                     # CPU, ~1-2 minutes
    python benchmarks/bench_pope.py --device cuda --full --dtype float16 --batch-sizes 1 8 32   # 7B shapes
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_interventions import build as build_intervention_model  # a sibling script in benchmarks/
from PIL import Image

from vlmscope.api import VLM
from vlmscope.eval.model_eval import answer_fn
from vlmscope.eval.runner import answer_questions
from vlmscope.models.tiny import build_tiny

OBJECTS = ["dog", "car", "person", "umbrella", "bottle", "chair"]


def build(config: str, args: argparse.Namespace) -> VLM:
    if config == "tiny":
        model, processor = build_tiny("llava")
        return VLM(model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval(), processor, "tiny-llava")
    # The intervention benchmark's models: the small 576-image-token LLaVA, or LLaVA-1.5-7B shapes.
    return build_intervention_model(argparse.Namespace(full=config == "full", dtype=args.dtype, device=args.device))


def write_questions(root: Path, n_images: int, per_image: int, width: int = 320, height: int = 240) -> list[dict]:
    """POPE-style questions: `per_image` questions about each of `n_images` random `width` x `height` images (as
    the official files: 6 questions per image), written as COCO-named JPEGs under `root`."""
    questions = []
    for i in range(n_images):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        pixels = (np.random.default_rng(i).random((height, width, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(root / name)
        for j in range(per_image):
            obj = OBJECTS[(i + j) % len(OBJECTS)]
            questions.append({"question_id": len(questions) + 1, "image": name,
                              "text": f"Is there a {obj} in the image?", "label": "yes" if j % 2 else "no",
                              "split": "random"})
    return questions


def run_once(vlm: VLM, questions: list[dict], root: Path, batch_size: int, max_new: int, device: str
             ) -> tuple[float, list[str]]:
    answer = answer_fn(vlm, " Please answer this question with one word.", max_new, "greedy", [])
    with tempfile.TemporaryDirectory() as out:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        store = answer_questions(questions, answer, Path(out) / "answers.jsonl", batch_size, progress=False,
                                 image_root=root)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        answers = [row["answer"] for row in store.rows()]
    return seconds, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--full", action="store_true", help="LLaVA-1.5-7B shapes (random weights) instead of small")
    parser.add_argument("--configs", nargs="+", default=None, help="tiny small (default) or full")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--per-image", type=int, default=6)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 6, 12])
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = args.configs or (["full"] if args.full else ["tiny", "small"])
    sizes = sorted(set(args.batch_sizes) | {1})
    print(f"POPE answering: {args.images} images x {args.per_image} questions, {args.max_new_tokens} new tokens, "
          f"device {args.device}, {args.dtype}")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        root = Path(tmp)
        questions = write_questions(root, args.images, args.per_image)
        for config in configs:
            vlm = build(config, args)
            run_once(vlm, questions[:2], root, 2, args.max_new_tokens, args.device)  # warm-up
            best: dict[int, float] = {}
            answers: dict[int, list[str]] = {}
            for _ in range(args.repeats):
                for size in sizes:
                    seconds, answers[size] = run_once(vlm, questions, root, size, args.max_new_tokens, args.device)
                    best[size] = min(best.get(size, float("inf")), seconds)
            base = best[1]
            print(f"\n[{config}] {len(questions)} questions")
            print(f"{'batch':>6} {'seconds':>8} {'questions/s':>12} {'speed-up':>9} {'answers equal':>14}")
            for size in sizes:
                same = sum(a == b for a, b in zip(answers[size], answers[1]))
                print(f"{size:>6} {best[size]:>8.2f} {len(questions) / best[size]:>12.1f} "
                      f"{base / best[size]:>8.2f}x {same:>7}/{len(questions)}")
            del vlm


if __name__ == "__main__":
    main()
