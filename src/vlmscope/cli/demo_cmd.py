"""`vlmscope demo`: the whole tool on the embedded model, on CPU, with an HTML report."""

from __future__ import annotations

import argparse
import fnmatch
import html
import json
import shutil
import time
from pathlib import Path
from typing import Any

from vlmscope.cli._common import min_int

# Methods shown side by side when registered (decoding spec, intervention specs).
DEMO_METHODS = [
    ("greedy", "greedy", []),
    ("beam", "beam:num_beams=3", []),
    ("opera", "opera:num_beams=3", []),
    ("pai", "greedy", ["pai:alpha=0.5"]),
    ("aai", "greedy", ["aai:alpha=0.5"]),
]
HEADS_SHOWN = 3  # localization heads drawn per scene
SCENES_SHOWN = 4  # scenes in the captions table, chosen among SCENE_CANDIDATES where the methods differ most
SCENE_CANDIDATES = 12
# Column headers of the metrics table (keys of the world's evaluate()).
METRIC_NAMES = {
    "object_recall": "object recall", "CHAIR_S": "CHAIR<sub>S</sub> (captions with a hallucination)",
    "CHAIR_I": "CHAIR<sub>I</sub> (hallucinated objects)", "pope_accuracy": "POPE accuracy", "pope_f1": "POPE F1",
    "pope_yes_ratio": "POPE yes ratio", "pope_random": "POPE random", "pope_popular": "POPE popular",
    "pope_adversarial": "POPE adversarial", "colour_accuracy": "colour accuracy",
    "seconds": "seconds (after warm-up)",
}
# What a demo writes into --out; a re-run replaces exactly these and refuses a folder holding anything else.
OWNED = ("report.html", "report.json", "scene*.png", "heads", "explain", "flow", "explorer.html")


def _owned(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in OWNED)


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="run the tool end to end on the embedded model (CPU, no download)")
    parser.add_argument("--out", default="vlmscope-demo", help="output directory (report.html inside)")
    parser.add_argument("--model", default=None, help="model to demo (default: the embedded shapes model)")
    parser.add_argument("--n", type=min_int(1), default=100, help="scenes per method for CHAIR/POPE (shapes model)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--world", choices=("auto", "shapes", "none"), default="auto",
                        help="scene world with ground truth (auto: shapes for the shapes model; set shapes for a "
                             "retrained shapes model directory)")
    parser.set_defaults(func=run)


def _available(decoding: str, interventions: list[str]) -> bool:
    from vlmscope.decoding import DECODINGS
    from vlmscope.interventions import INTERVENTIONS

    names = [decoding.split(":")[0]]
    if names[0] not in DECODINGS.names():
        return False
    return all(i.split(":")[0] in INTERVENTIONS.names() for i in interventions)


class _Progress:
    """Numbered stage lines with the elapsed time, flushed at once (the demo is watched while it runs)."""

    def __init__(self, stages: int) -> None:
        self.stages, self.stage, self.start = stages, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.stage += 1
        print(f"[{self.stage}/{self.stages}] {message}  ({self.elapsed():.0f} s)", flush=True)

    def detail(self, message: str) -> None:
        print(f"      {message}  ({self.elapsed():.0f} s)", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def run(args: argparse.Namespace) -> int:
    import torch

    import vlmscope
    from vlmscope.errors import InputError
    from vlmscope.models.loading import builtin_names

    if args.n < 1:
        raise InputError(f"--n must be at least 1 (got {args.n})")
    from vlmscope.cli._common import check_out_dir

    out = check_out_dir(args.out, _owned, "demo")
    if out.is_dir():  # a previous demo: its files go, so no stale figure survives beside the new report
        for path in list(out.iterdir()):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    model_name = args.model or ("shapes" if "shapes" in builtin_names() else "tiny-llava")
    note = ""
    if model_name == "tiny-llava":
        note = ("The embedded shapes model is not available in this build: the demo runs on a random tiny "
                "LLaVA, so the captions are noise; the pipeline is real.")
        print(note)
    progress = _Progress(6)
    progress(f"loading {model_name}")
    vlm = vlmscope.load(model_name, device="cpu")
    world = _world("shapes" if args.world == "shapes" or (args.world == "auto" and model_name == "shapes")
                   else "none")
    prompt = world["prompt"]
    candidates = world["scenes"](SCENE_CANDIDATES, args.seed)
    candidate_images = [world["render"](s) for s in candidates]
    methods = [(n, d, iv) for n, d, iv in DEMO_METHODS if _available(d, iv)]
    progress(f"captions of {len(candidates)} candidate scenes with {', '.join(n for n, *_ in methods)}")
    all_captions: dict[str, list[str]] = {}
    with torch.no_grad():
        for name, decoding, interventions in methods:
            results = vlm.generate(candidate_images, [prompt] * len(candidates),
                                   max_new_tokens=world["max_new_tokens"], decoding=decoding,
                                   interventions=interventions)
            all_captions[name] = [r.text for r in results]
    # Show the scenes where the methods disagree most (distinct captions), so the table shows their effect.
    chosen = _scenes_that_differ(all_captions, len(candidates), SCENES_SHOWN)
    scenes = [candidates[i] for i in chosen]
    images = [candidate_images[i] for i in chosen]
    captions = {name: [caps[i] for i in chosen] for name, caps in all_captions.items()}
    for i, image in enumerate(images):
        image.save(out / f"scene{i}.png")
    truths = [", ".join(f"{colour} {cat}" for cat, colour, _ in world["objects"](s)) for s in scenes] \
        if world.get("objects") else []
    truth_sets = [[cat for cat, _, _ in world["objects"](s)] for s in scenes] if world.get("objects") else []
    metrics: dict[str, Any] = {}
    if world.get("evaluate") is not None:
        progress(f"CHAIR and POPE on {args.n} scenes per method")
        # Warm-up run, discarded: the first method's seconds must not pay for lazy loading and first calls.
        world["evaluate"](vlm, 4, args.seed + 1, "greedy", [])  # POPE needs a pool of a few scenes
        for name, decoding, interventions in methods:
            metrics[name] = world["evaluate"](vlm, args.n, args.seed + 1, decoding, interventions)
            m = metrics[name]
            progress.detail(f"{name}: recall {m['object_recall']:.1f}  CHAIR_S {m['CHAIR_S']:.1f}  "
                            f"CHAIR_I {m['CHAIR_I']:.1f}  POPE acc {m['pope_accuracy']:.1f}")
    else:
        progress("CHAIR / POPE need the shapes world: skipped")
    progress("localization heads")
    heads = _localization_heads(vlm, images, scenes, world, out, progress)
    progress("attention maps and information flow")
    truth = {cat for cat, _, _ in world["objects"](scenes[0])} if world.get("objects") else None
    figures = _explain_figures(vlm, images[0], world, heads, out, truth)
    report = {"model": model_name, "note": note, "prompt": prompt, "truths": truths, "captions": captions,
              "truth_objects": truth_sets, "methods": {n: _method_specs(d, iv) for n, d, iv in methods},
              "scene_candidates": len(candidates), "metrics": metrics, "heads": heads, "figures": figures,
              "seconds": round(progress.elapsed(), 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(_html(report, len(images)))
    progress(f"wrote {out / 'report.html'} in {report['seconds']} s")
    return 0


def _world(model_name: str) -> dict[str, Any]:
    if model_name == "shapes":
        from vlmscope.shapes import demo_world

        return demo_world()
    import numpy as np
    from PIL import Image

    def scenes(n: int, seed: int) -> list[int]:
        return [seed + i for i in range(n)]

    def render(seed: int) -> Any:
        rng = np.random.default_rng(seed)
        return Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8"))

    return {"scenes": scenes, "render": render, "prompt": "describe this image .", "max_new_tokens": 12,
            "evaluate": None}


def _localization_heads(vlm: Any, images: list[Any], scenes: list[Any], world: dict[str, Any], out: Path,
                        progress: _Progress) -> dict[str, Any]:
    """Rank localization heads on the demo scenes (`vlmscope.explain.heads`), draw the top heads' maps for
    every object word of the greedy caption, and, on the shapes world, score them with the pointing game."""
    from vlmscope.explain import render
    from vlmscope.explain.heads import rank_heads
    from vlmscope.explain.maps import explain

    ranking = rank_heads(vlm, images, world["prompt"], top_k=HEADS_SHOWN, min_layer=min(2, vlm.adapter.num_layers - 1))
    ranking.save(out / "heads")
    top = ranking.heads(HEADS_SHOWN)
    result: dict[str, Any] = {"ranking": [[layer, head] for layer, head in top], "figures": []}
    if not top:
        return result
    progress.detail("top heads: " + ", ".join(f"L{layer}H{head}" for layer, head in top))
    is_object = world.get("is_object_word", _is_object_word)
    layers = sorted({layer for layer, _ in top})
    for i, image in enumerate(images[:2]):
        res = explain(vlm, image, world["prompt"], layers=layers, max_new_tokens=world["max_new_tokens"])
        steps = [s for s, tok in enumerate(res.tokens) if is_object(tok)] or list(range(min(4, len(res.tokens))))
        heats, titles = [], []
        for layer, head in top:
            for s in steps:
                heats.append(res.maps[s, res.layers.index(layer), res.heads.index(head)])
                titles.append(f"L{layer}H{head} → {render.safe_label(res.tokens[s])}")
        fig = render.overlay_grid(image, heats, res.grids[0].region, titles, render.color_limits(heats, "per-map"),
                                  columns=len(steps), suptitle=f"localization heads: {res.text!r}"[:120])
        path = out / "heads" / f"scene{i}_heads.png"
        fig.savefig(path)
        result["figures"].append(str(path.relative_to(out)))
    pointing = world.get("pointing")
    if pointing is not None:
        game = pointing(vlm, world["scenes"](20, 99), top)
        result["pointing"] = {"n": game["n"], "hit_rate": {f"L{lh[0]}H{lh[1]}": r for lh, r in game["hit_rate"].items()}}
        progress.detail("pointing game (peak of the object word's map inside its box): "
                        + ", ".join(f"{k} {v:.0%}" for k, v in result["pointing"]["hit_rate"].items()))
    return result


def _is_object_word(token: str) -> bool:
    from vlmscope.shapes.vocab import word_to_category

    return word_to_category(token.strip()) is not None


def _explain_figures(vlm: Any, image: Any, world: dict[str, Any], heads: dict[str, Any], out: Path,
                     truth: set[str] | None = None) -> list[str]:
    from vlmscope.explain.explorer import save_explorer
    from vlmscope.explain.flow import flow
    from vlmscope.explain.maps import explain

    figures: list[str] = []
    ranked = heads.get("ranking") or []
    layer = ranked[0][0] if ranked else world.get("explain_layer", vlm.adapter.num_layers // 2)
    # The explorer page gets every layer of the top heads (so "localization heads" is offered), all heads.
    layers = sorted({layer, *(int(lay) for lay, _ in ranked)})
    result = explain(vlm, image, world["prompt"], layers=layers, max_new_tokens=world["max_new_tokens"])
    single = restrict_to_layer(result, layer)
    single.save(out / "explain", reduce="layers,heads")
    figures += sorted(str(p.relative_to(out)) for p in (out / "explain").glob("steps*.png"))
    flow_result = flow(vlm, image, world["prompt"])
    flow_result.save(out / "flow")
    figures += sorted(str(p.relative_to(out)) for p in (out / "flow").glob("*.png"))
    def hallucinated(res: Any) -> list[int]:
        return [s for s, token in zip(res.steps, res.tokens)
                if truth is not None and _object_category(token) not in (None, *truth)]

    # Greedy beside OPERA (when registered): OPERA only re-ranks beams, so its answer's maps come from one
    # teacher-forced pass (explain_answer).
    compare: dict[str, Any] = {}
    opera = next((d for n, d, iv in DEMO_METHODS if n == "opera" and not iv and _available(d, iv)), None)
    if opera is not None:
        from vlmscope.explain.explorer import explain_answer

        other = vlm.generate(image, world["prompt"], max_new_tokens=world["max_new_tokens"], decoding=opera)
        answer = explain_answer(vlm, image, world["prompt"], other.token_ids, layers=layers, decoding=opera)
        compare = {"compare": answer, "labels": ("greedy", opera),
                   "compare_hallucinated_steps": hallucinated(answer)}
    save_explorer(result, out / "explorer.html", localization_heads=[tuple(p) for p in ranked], flow=flow_result,
                  hallucinated_steps=hallucinated(result), title=f"vlmscope demo: {world['prompt']}", **compare)
    return figures


def restrict_to_layer(result: Any, layer: int) -> Any:
    """The same result restricted to one captured layer (the demo's static figures show one layer)."""
    from dataclasses import replace

    li = result.layers.index(layer)
    return replace(result, grid_maps={k: v[:, li:li + 1] for k, v in result.grid_maps.items()}, layers=[layer])


def _object_category(token: str) -> str | None:
    from vlmscope.shapes.vocab import word_to_category

    return word_to_category(token.strip())


def _scenes_that_differ(captions: dict[str, list[str]], n: int, k: int) -> list[int]:
    """The `k` scene indices whose captions differ most across methods (most distinct captions; ties: first)."""
    distinct = [len({caps[i] for caps in captions.values()}) for i in range(n)]
    return sorted(sorted(range(n), key=lambda i: -distinct[i])[:k])


def _method_specs(decoding: str, interventions: list[str]) -> str:
    """The full registry specs (every parameter) of a demo method, as the report shows them."""
    from vlmscope.decoding import DECODINGS
    from vlmscope.interventions import INTERVENTIONS
    from vlmscope.registry import spec_string

    specs = [spec_string(DECODINGS.from_config(decoding))]
    specs += [spec_string(INTERVENTIONS.from_config(i)) for i in interventions]
    return " + ".join(specs)


def _marked_caption(caption: str, truth: list[str] | None) -> str:
    """The caption, HTML-escaped, with object words that are not in the scene marked as hallucinated."""
    if not truth:
        return html.escape(caption)
    words = []
    for word in caption.split(" "):
        category = _object_category(word.strip(".,;:"))
        if category is not None and category not in truth:
            words.append(f"<mark title='not in the scene'>{html.escape(word)}</mark>")
        else:
            words.append(html.escape(word))
    return " ".join(words)


def _figure_caption(path: str) -> str:
    """What a figure file shows, in words (the report's captions are not file names)."""
    name = Path(path).name
    for pattern, text in (("steps*", "Attention to the image of every generated token (mean over the heads of "
                                     "the shown layer)"),
                          ("flows*", "Information flow per layer: attention shares and saliency flows"),
                          ("cam*", "LLaVA-CAM per layer"),
                          ("*heads*", "Top localization heads: their maps per scene")):
        if fnmatch.fnmatch(name, pattern):
            return text
    return name


def _metric_cell(value: Any) -> str:
    return f"<td>{value:.1f}</td>" if isinstance(value, float) else f"<td>{html.escape(str(value))}</td>"


def _html(report: dict[str, Any], n_images: int) -> str:
    esc = html.escape
    rows = []
    for i in range(n_images):
        truth = f"<br><small>{esc(report['truths'][i])}</small>" if report.get("truths") else ""
        truth_objects = report["truth_objects"][i] if report.get("truth_objects") else None
        cells = "".join(f"<td>{_marked_caption(caps[i], truth_objects)}</td>" for caps in report["captions"].values())
        rows.append(f"<tr><td><img src='scene{i}.png' width='128'>{truth}</td>{cells}</tr>")
    specs = report.get("methods") or {}
    head = "".join(f"<th>{esc(n)}</th>" for n in report["captions"])
    # Every parameter of every method, as the registry spells it (long: a list, not the table headers).
    method_list = "".join(f"<li><b>{esc(n)}</b>: <code>{esc(spec)}</code></li>" for n, spec in specs.items())
    metric_rows = ""
    if report["metrics"]:
        keys = [k for k in ("object_recall", "CHAIR_S", "CHAIR_I", "pope_accuracy", "pope_f1", "pope_yes_ratio",
                            "pope_random", "pope_popular", "pope_adversarial", "colour_accuracy", "seconds")
                if any(k in m for m in report["metrics"].values())]
        n = next(iter(report["metrics"].values())).get("n", "")
        metric_rows = (f"<h2>CHAIR and POPE ({n} held-out scenes per method, percent)</h2>"
                       "<table><tr><th>method</th>" + "".join(f"<th>{METRIC_NAMES.get(k, esc(k))}</th>" for k in keys)
                       + "</tr>")
        metric_rows += "".join("<tr><td>" + esc(name) + "</td>" + "".join(_metric_cell(m.get(k, "")) for k in keys)
                               + "</tr>" for name, m in report["metrics"].items()) + "</table>"
    heads = report.get("heads") or {}
    head_html = ""
    if heads.get("ranking"):
        names = ", ".join(f"L{layer}H{head}" for layer, head in heads["ranking"])
        head_html = (f"<h2>Localization heads</h2><p>Top heads by the Kang et al. criteria (attention sum elbow, "
                     f"spatial entropy): {esc(names)} (<a href='heads/run.json'>run.json</a>).</p>")
        if heads.get("pointing"):
            rates = ", ".join(f"{k}: {v:.0%}" for k, v in heads["pointing"]["hit_rate"].items())
            head_html += (f"<p>Pointing game on {heads['pointing']['n']} objects (peak of the object word's map "
                          f"inside the object's box): {esc(rates)}</p>")
        # Figures at their natural size (never scaled up, blurred), at most the page width.
        head_html += "".join(f"<figure><img src='{esc(f)}'><figcaption>{esc(_figure_caption(f))}</figcaption>"
                             "</figure>" for f in heads.get("figures", []))
    figs = "".join(f"<figure><img src='{esc(f)}'><figcaption>{esc(_figure_caption(f))}</figcaption></figure>"
                   for f in report["figures"])
    return f"""<!doctype html><meta charset="utf-8"><title>vlmscope demo</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}} figure{{display:inline-block}} figure img{{max-width:100%}}
mark{{background:#f6c6c0}} .specs code{{word-break:break-all}} td{{min-width:9em}}</style>
<h1>vlmscope demo — {esc(report['model'])}</h1><p>{esc(report['note'])}</p>
<p>Prompt: <code>{esc(report['prompt'])}</code> · {report['seconds']} s on CPU</p>
<h2>Methods</h2><ul class='specs'>{method_list}</ul>
<h2>Captions</h2><p>The {n_images} scenes (of {report.get('scene_candidates', n_images)} candidates) where the
methods' captions differ most; objects not in the scene are <mark>marked</mark>.</p><table><tr><th>image</th>{head}</tr>{''.join(rows)}</table>{metric_rows}{head_html}
<h2>Attention and information flow</h2>
<p><a href='explorer.html'>Open the attention explorer</a>: click a generated word to see where the model looked,
per layer and head (hallucinated objects underlined).</p>{figs}"""
