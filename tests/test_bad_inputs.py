"""Every subcommand over a table of bad inputs: exit 2, one line `error: ...` on stderr, nothing written.

The table holds the cases of issue 12 (eval ranges and typos, scoring files, --device on a CPU-only torch,
`--out` naming a file) and the single-shot cases that were already right, so none of them regresses.
All cases fail before a model would load, except a few that need the tiny model's layer/head counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vlmscope.cli import main

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder of inputs, good and bad, named in the table below as {name}."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bad-inputs")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "image.png")
    (root / "broken.png").write_text("not a png")
    coco = root / "coco"
    coco.mkdir()
    Image.new("RGB", (40, 40)).save(coco / "COCO_val2014_000000000139.jpg")
    (root / "empty_dir").mkdir()
    (root / "taken.txt").write_text("a file where a folder is expected")
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("someone else's")

    def jsonl(name: str, rows: list[dict]) -> None:
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("caps.jsonl", [{"image_id": 139, "caption": "a dog ."}])
    jsonl("dup_caps.jsonl", [{"image_id": 139, "caption": "a dog ."}, {"image_id": 139, "caption": "a cat ."}])
    (root / "empty.jsonl").write_text("")
    (root / "gt.json").write_text(json.dumps({"139": ["dog"]}))
    questions = [{"question_id": i, "image": "COCO_val2014_000000000139.jpg", "text": "Is there a dog?",
                  "label": lab} for i, lab in ((1, "yes"), (2, "no"))]
    jsonl("coco_pope_random.jsonl", questions)
    jsonl("dup_answers.jsonl", [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"},
                                {"question_id": 1, "answer": "no"}])
    jsonl("extra_answers.jsonl", [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"},
                                  {"question_id": 7, "answer": "no"}])
    jsonl("mixed_answers.jsonl", [{"question_id": 1, "answer": "yes"}, {"answer": "no"}])
    (root / "typo.yaml").write_text("model: tiny-llava\nchair: {max_new_token: 32}\n")
    (root / "typo_pope.yaml").write_text("model: tiny-llava\npope: {promt_suffix: ' Answer yes or no.'}\n")
    (root / "run_without_metrics").mkdir()
    return root


M = ["--model", "tiny-llava"]
GEN = ["generate", *M, "--image", "{image.png}", "--prompt", "describe ."]
EXPLAIN = ["explain", *M, "--image", "{image.png}", "--prompt", "describe .", "--max-new-tokens", "2"]
FLOW = ["flow", *M, "--image", "{image.png}", "--prompt", "describe .", "--max-new-tokens", "2"]
EXPLORE = ["explore", *M, "--image", "{image.png}", "--prompt", "describe .", "--max-new-tokens", "2"]
LENS = ["lens", *M, "--image", "{image.png}", "--prompt", "describe ."]
ABLATE = ["ablate", *M, "--image", "{image.png}", "--prompt", "describe .", "--max-new-tokens", "2"]
PATCH = ["patch", *M, "--image", "{image.png}", "--corrupt-image", "{image.png}", "--prompt", "describe .",
         "--max-new-tokens", "2"]
HEADS = ["heads", *M, "--images", "{image.png}", "--prompt", "the dog"]
CHAIR = ["chair", "--gt-objects", "{gt.json}"]
POPE = ["pope", "score", "--questions", "{coco_pope_random.jsonl}"]
EVAL_CHAIR = ["eval", "chair", *M, "--data-path", "{coco}", "--out", "{new_run}", "--max-new-tokens", "2"]
EVAL_POPE = ["eval", "pope", *M, "--data-path", "{coco}", "--out", "{new_run}", "--max-new-tokens", "2"]

CASES = {
    # generate (already right on old main, kept)
    "generate broken image": [*GEN[:4], "{broken.png}", *GEN[5:]],
    "generate missing image": [*GEN[:4], "{missing.png}", *GEN[5:]],
    "generate missing model": ["generate", "--model", "{no_model}", *GEN[3:]],
    "generate bad decoding param": [*GEN, "--decoding", "beam:k=1"],
    "generate unknown decoding": [*GEN, "--decoding", "nucleus"],
    "generate bad intervention": [*GEN, "--intervention", "pai:alfa=1"],
    # issue 18 methods: bad parameters, layers this model lacks, declared conflicts
    "generate m3id bad t0": [*GEN, "--intervention", "m3id:t0=2"],
    "generate icd bad beta": [*GEN, "--intervention", "icd:beta=1"],
    "generate icd bad placement": [*GEN, "--intervention", "icd:placement=user"],
    "generate dola layer past depth": [*GEN, "--intervention", "dola:layers=[9]"],
    "generate dola bad divergence": [*GEN, "--intervention", "dola:divergence=kl"],
    "generate vaf layers past depth": [*GEN, "--intervention", "vaf"],
    "generate deco layers past depth": [*GEN, "--intervention", "deco"],
    "generate vista window past depth": [*GEN, "--intervention", "vista"],
    "generate vista bad gamma": [*GEN, "--intervention", "vista:gamma=2"],
    "generate sid layer past depth": [*GEN, "--intervention", "sid:layer=4"],
    "generate sid zero keep": [*GEN, "--intervention", "sid:keep=0"],
    "generate deco with dola": [*GEN, "--intervention", "deco:start=1", "--intervention", "dola"],
    "generate icd with vcd": [*GEN, "--intervention", "icd", "--intervention", "vcd"],
    "generate dola with m3id": [*GEN, "--intervention", "dola", "--intervention", "m3id"],
    "generate zero tokens": [*GEN, "--max-new-tokens", "0"],
    "generate prompts for images": [*GEN, "--image", "{image.png}", "--image", "{image.png}", "--prompt", "x"],
    "generate bad dtype": [*GEN, "--dtype", "float17"],
    "generate unknown option": [*GEN, "--temperature", "2"],
    "generate missing prompt": GEN[:5],
    "generate bad device": [*GEN, "--device", "gpu"],
    "generate fastv rerank with beams": [*GEN, "--intervention", "fastv:k=1,rerank=every_step", "--decoding",
                                         "beam:num_beams=2"],
    "generate fastv rerank with opera": [*GEN, "--intervention", "fastv:k=1,rerank=every_step", "--decoding",
                                         "opera:num_beams=1"],
    "generate fastv rerank with another": [*GEN, "--intervention", "fastv:k=1,rerank=every_step",
                                           "--intervention", "pai"],
    "generate fastv bad rerank": [*GEN, "--intervention", "fastv:rerank=always"],
    "generate absent cuda index": [*GEN, "--device", "cuda:99"],
    # explain / flow / heads
    "explain out is a file": [*EXPLAIN, "--out", "{taken.txt}"],
    "explain out holds foreign files": [*EXPLAIN, "--out", "{foreign}"],
    "explain layer out of range": [*EXPLAIN, "--out", "{new_out}", "--layers", "99"],
    "explain bad heads": [*EXPLAIN, "--out", "{new_out}", "--heads", "x"],
    "explain bad reduce": [*EXPLAIN, "--out", "{new_out}", "--reduce", "tokens"],
    "explain negative tokens": [*EXPLAIN, "--out", "{new_out}", "--max-new-tokens", "-1"],
    "explain absent cuda index": [*EXPLAIN, "--out", "{new_out}", "--device", "cuda:99"],
    "explain html is a folder": [*EXPLAIN, "--out", "{new_out}", "--html", "{empty_dir}"],
    "explain html page over budget": [*EXPLAIN, "--out", "{new_out}", "--html", "{page.html}", "--max-page-mb", "0"],
    "explore out is a folder": [*EXPLORE, "--out", "{empty_dir}"],
    "explore out not html": [*EXPLORE, "--out", "{page.txt}"],
    "explore model and result": [*EXPLORE, "--result", "{empty_dir}", "--out", "{page.html}"],
    "explore result not explain": ["explore", "--result", "{empty_dir}", "--image", "{image.png}", "--out",
                                   "{page.html}"],
    "explore bad localization heads": [*EXPLORE, "--out", "{page.html}", "--localization-heads", "3-1"],
    "explore localization head out of range": [*EXPLORE, "--out", "{page.html}", "--localization-heads", "1:99"],
    "explore layer out of range": [*EXPLORE, "--out", "{page.html}", "--layers", "99"],
    "lens out is a file": [*LENS, "--out", "{taken.txt}"],
    "lens out holds foreign files": [*LENS, "--out", "{foreign}"],
    "lens layer out of range": [*LENS, "--out", "{new_out}", "--layers", "99"],
    "lens zero top": [*LENS, "--out", "{new_out}", "--top-k", "0"],
    "lens empty word": [*LENS, "--out", "{new_out}", "--word", " "],
    "ablate head out of range": [*ABLATE, "--out", "{new_out}", "--heads", "99"],
    "ablate bad mode": [*ABLATE, "--out", "{new_out}", "--mode", "resample"],
    "ablate empty answer": [*ABLATE, "--out", "{new_out}", "--answer", " "],
    "patch missing corrupt image": [*PATCH[:6], "{missing.png}", *PATCH[7:], "--out", "{new_out}"],
    "patch bad positions": [*PATCH, "--out", "{new_out}", "--positions", "all"],
    "flow out is a file": [*FLOW, "--out", "{taken.txt}"],
    "flow zero chunk": [*FLOW, "--out", "{new_out}", "--chunk-size", "0"],
    "flow negative sigma": [*FLOW, "--out", "{new_out}", "--smooth-sigma", "-1"],
    "flow bad layers": [*FLOW, "--out", "{new_out}", "--layers", "a-b"],
    "heads empty folder": ["heads", *M, "--images", "{empty_dir}", "--prompt", "x"],
    "heads zero top": [*HEADS, "--top", "0"],
    "heads missing coco annotations": [*HEADS, "--coco-annotations", "{missing_dir}"],
    "heads coco annotations without instances": [*HEADS, "--coco-annotations", "{empty_dir}"],
    "heads coco prompt without word": [*HEADS, "--coco-annotations", "{gt.json}", "--coco-prompt", "where?"],
    "heads out is a file": [*HEADS, "--out", "{caps.jsonl}"],
    # chair / pope scoring
    "chair no captions": CHAIR,
    "chair missing file": [*CHAIR, "--captions", "{missing.jsonl}"],
    "chair empty file": [*CHAIR, "--captions", "{empty.jsonl}"],
    "chair duplicate ids": [*CHAIR, "--captions", "{dup_caps.jsonl}"],
    "chair missing annotations": ["chair", "--captions", "{caps.jsonl}", "--coco-annotations", "{missing_dir}"],
    "chair save is a folder": [*CHAIR, "--captions", "{caps.jsonl}", "--save", "{empty_dir}"],
    "chair cache-gt missing annotations": ["chair", "cache-gt", "--coco-annotations", "{missing_dir}", "--out",
                                           "{gt_out.json}"],
    "pope duplicate ids": [*POPE, "--answers", "{dup_answers.jsonl}"],
    "pope unknown ids": [*POPE, "--answers", "{extra_answers.jsonl}"],
    "pope mixed ids": [*POPE, "--answers", "{mixed_answers.jsonl}"],
    "pope empty answers": [*POPE, "--answers", "{empty.jsonl}"],
    "pope bad rule": [*POPE, "--answers", "{dup_answers.jsonl}", "--rule", "strict"],
    "pope build missing instances": ["pope", "build", "--instances", "{missing.json}", "--out", "{new_out}"],
    "pope build zero images": ["pope", "build", "--instances", "{gt.json}", "--out", "{new_out}", "--num-images", "0"],
    # eval runs
    "eval negative tokens": [*EVAL_CHAIR, "--max-new-tokens", "-5"],
    "eval zero tokens": [*EVAL_CHAIR, "--max-new-tokens", "0"],
    "eval zero batch": [*EVAL_CHAIR, "--batch-size", "0"],
    "eval zero images": [*EVAL_CHAIR, "--num-images", "0"],
    "eval nested typo chair": [*EVAL_CHAIR, "--config", "{typo.yaml}"],
    "eval nested typo pope": [*EVAL_POPE, "--config", "{typo_pope.yaml}", "--questions", "{coco_pope_random.jsonl}"],
    "eval missing config": [*EVAL_CHAIR, "--config", "{missing.yaml}"],
    "eval missing data": ["eval", "chair", *M, "--data-path", "{missing_dir}", "--out", "{new_run}"],
    "eval bad decoding": [*EVAL_CHAIR, "--decoding", "beam:k=1"],
    "eval missing gt": [*EVAL_CHAIR, "--gt-objects", "{missing.json}"],
    "eval out is a file": ["eval", "chair", *M, "--data-path", "{coco}", "--out", "{taken.txt}"],
    "eval out holds foreign files": ["eval", "chair", *M, "--data-path", "{coco}", "--out", "{foreign}"],
    "eval absent cuda index": [*EVAL_CHAIR, "--device", "cuda:99"],
    "eval pope no questions": EVAL_POPE,
    "eval pope missing questions": [*EVAL_POPE, "--questions", "{missing.jsonl}"],
    "eval pope bad rule": [*EVAL_POPE, "--questions", "{coco_pope_random.jsonl}", "--rule", "strict"],
    # issue 20: POPE sets by name, a folder per dataset, AMBER runs and scoring, the lmms-eval tasks' path
    "eval pope unknown set name": [*EVAL_POPE, "--questions", "okvqa-random"],
    "eval pope set given twice": [*EVAL_POPE, "--questions", "gqa", "gqa-random"],
    "eval pope folder for an unknown dataset": [*EVAL_POPE, "--questions", "gqa-random", "--data-path",
                                                "vqa={coco}"],
    "eval pope gqa images missing": ["eval", "pope", *M, "--data-path", "{empty_dir}", "--out", "{new_run}",
                                     "--questions", "gqa-random"],
    "eval chair two folders": [*EVAL_CHAIR, "--data-path", "{empty_dir}"],
    "eval amber unknown task": ["eval", "amber", *M, "--data-path", "{empty_dir}", "--out", "{new_run}",
                                "--amber-task", "captions"],
    "eval amber unknown parser": ["eval", "amber", *M, "--data-path", "{empty_dir}", "--out", "{new_run}",
                                  "--amber-parser", "fuzzy"],
    "eval amber images missing": ["eval", "amber", *M, "--data-path", "{empty_dir}", "--out", "{new_run}",
                                  "--num-images", "1"],
    "amber score missing file": ["amber", "score", "{missing.json}"],
    "amber score not responses": ["amber", "score", "{gt.json}"],
    "amber score unknown parser": ["amber", "score", "{gt.json}", "--parser", "fuzzy"],
    "lmms-tasks-path extra argument": ["lmms-tasks-path", "pope"],
    # the rest
    "compare missing run": ["compare", "{missing_dir}"],
    "compare run without metrics": ["compare", "{run_without_metrics}"],
    "codebook build missing images": ["codebook", "build", *M, "--images", "{missing_dir}", "--out", "{cb.pt}"],
    "codebook build zero images": ["codebook", "build", *M, "--images", "{coco}", "--out", "{cb.pt}",
                                   "--num-images", "0"],
    "codebook info missing file": ["codebook", "info", "{missing.pt}"],
    "tiny-model unknown arch": ["tiny-model", "--arch", "gpt2", "--out", "{new_out}"],
    "tiny-model out is a file": ["tiny-model", "--arch", "llava", "--out", "{taken.txt}"],
    "convert unknown family": ["convert", "llava", "--checkpoint", "{empty_dir}", "--out", "{new_out}"],
    "convert shikra checkpoint missing": ["convert", "shikra", "--checkpoint", "{new_out}", "--out", "{new_out}"],
    "convert shikra not a checkpoint": ["convert", "shikra", "--checkpoint", "{empty_dir}", "--out", "{new_out}"],
    "convert out holds files": ["convert", "shikra", "--checkpoint", "{empty_dir}", "--out", "{foreign}"],
    "convert minigpt4 without --llm": ["convert", "minigpt4", "--checkpoint", "{taken.txt}", "--out", "{new_out}"],
    "shapes-eval zero scenes": ["shapes-eval", "--n", "0"],
    "shapes-eval bad decoding": ["shapes-eval", "--n", "2", "--decoding", "beam:k=1"],
    "demo out is a file": ["demo", "--out", "{taken.txt}"],
    "methods extra argument": ["methods", "beam"],
    "models json and markdown": ["models", "--json", "--markdown"],
    "models extra argument": ["models", "gemma3"],
    "explain on a gemma3 sliding-window layer": ["explain", "--model", "tiny-gemma3", "--image", "{image.png}",
                                                 "--prompt", "hi", "--layers", "0", "--out", "{new_out}"],
    "unknown command": ["frobnicate"],
}
if NO_CUDA:
    # Old main: AssertionError("Torch not compiled with CUDA enabled") from deep inside torch.
    CASES["generate cuda on a CPU-only torch"] = [*GEN, "--device", "cuda"]
    CASES["eval cuda on a CPU-only torch"] = [*EVAL_CHAIR, "--device", "cuda"]


def _expand(argv: list[str], root: Path) -> list[str]:
    out = []
    for arg in argv:
        if arg.startswith("{") and arg.endswith("}"):
            arg = str(root / arg[1:-1])
        out.append(arg)
    return out


def _tree(root: Path) -> dict[str, tuple[bool, int]]:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0) for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(world, tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/, vlmscope-demo/) would land here
    before, cwd_before = _tree(world), sorted(os.listdir(tmp_path))
    capsys.readouterr()
    code = main(_expand(CASES[name], world))
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    # tqdm bars of a model load may precede the error; the error itself is the one line that counts.
    err = [line for line in err if not line.startswith("Loading weights")]
    assert code == 2, (name, captured.err)
    assert len(err) == 1 and err[0].startswith("error: "), (name, captured.err)
    assert captured.out == "", (name, captured.out)
    assert _tree(world) == before, name
    assert sorted(os.listdir(tmp_path)) == cwd_before, name


def test_internal_errors_keep_their_traceback(monkeypatch):
    """A bug is not a user error: it must not be flattened into `error: ...` / exit 2."""
    import vlmscope.cli.generate_cmd as generate_cmd

    def broken(args):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(generate_cmd, "run_methods", broken)
    with pytest.raises(ZeroDivisionError):
        main(["methods"])
