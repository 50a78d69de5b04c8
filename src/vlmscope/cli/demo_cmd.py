"""`vlmscope demo`: the whole tool on the embedded model, on CPU, with an HTML report."""

from __future__ import annotations

import argparse
import html
import json
import time
from pathlib import Path
from typing import Any

# Methods shown side by side when registered (decoding spec, intervention specs).
DEMO_METHODS = [
    ("greedy", "greedy", []),
    ("beam", "beam:num_beams=3", []),
    ("opera", "opera:num_beams=3", []),
    ("pai", "greedy", ["pai:alpha=0.5"]),
    ("aai", "greedy", ["aai:alpha=0.5"]),
]


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="run the tool end to end on the embedded model (CPU, no download)")
    parser.add_argument("--out", default="vlmscope-demo", help="output directory (report.html inside)")
    parser.add_argument("--model", default=None, help="model to demo (default: the embedded shapes model)")
    parser.add_argument("--n", type=int, default=100, help="scenes per method for CHAIR/POPE (shapes model)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.set_defaults(func=run)


def _available(decoding: str, interventions: list[str]) -> bool:
    from vlmscope.decoding import DECODINGS
    from vlmscope.interventions import INTERVENTIONS

    names = [decoding.split(":")[0]]
    if names[0] not in DECODINGS.names():
        return False
    return all(i.split(":")[0] in INTERVENTIONS.names() for i in interventions)


def run(args: argparse.Namespace) -> int:
    import vlmscope
    from vlmscope.models.loading import builtin_names

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_name = args.model or ("shapes" if "shapes" in builtin_names() else "tiny-llava")
    note = ""
    if model_name == "tiny-llava":
        note = ("The embedded shapes model is not available in this build: the demo runs on a random tiny "
                "LLaVA, so the captions are noise; the pipeline is real.")
        print(note)
    start = time.perf_counter()
    print(f"[1/4] loading {model_name}")
    vlm = vlmscope.load(model_name, device="cpu")
    world = _world(model_name)
    scenes, images, prompt = world["scenes"](4, args.seed), None, world["prompt"]
    images = [world["render"](s) for s in scenes]
    for i, image in enumerate(images):
        image.save(out / f"scene{i}.png")
    methods = [(n, d, iv) for n, d, iv in DEMO_METHODS if _available(d, iv)]
    print(f"[2/4] captions with {', '.join(n for n, *_ in methods)}")
    captions: dict[str, list[str]] = {}
    for name, decoding, interventions in methods:
        results = vlm.generate(images, [prompt] * len(images), max_new_tokens=world["max_new_tokens"],
                               decoding=decoding, interventions=interventions)
        captions[name] = [r.text for r in results]
    metrics: dict[str, Any] = {}
    if world.get("evaluate") is not None:
        print(f"[3/4] CHAIR and POPE on {args.n} scenes per method")
        for name, decoding, interventions in methods:
            metrics[name] = world["evaluate"](vlm, args.n, args.seed + 1, decoding, interventions)
    else:
        print("[3/4] CHAIR / POPE need the shapes world: skipped")
    print("[4/4] attention maps and information flow")
    figures = _explain_figures(vlm, images[0], world, out)
    report = {"model": model_name, "note": note, "prompt": prompt, "captions": captions, "metrics": metrics,
              "figures": figures, "seconds": round(time.perf_counter() - start, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(_html(report, len(images)))
    print(f"wrote {out / 'report.html'} in {report['seconds']} s")
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


def _explain_figures(vlm: Any, image: Any, world: dict[str, Any], out: Path) -> list[str]:
    figures: list[str] = []
    try:
        from vlmscope.explain.maps import explain
    except ImportError:
        return figures
    layer = world.get("explain_layer", vlm.adapter.num_layers // 2)
    result = explain(vlm, image, world["prompt"], layers=[layer], max_new_tokens=world["max_new_tokens"])
    result.save(out / "explain")
    figures += sorted(str(p.relative_to(out)) for p in (out / "explain").glob("*.png"))[:8]
    try:
        from vlmscope.explain.flow import flow
    except ImportError:
        return figures
    flow_result = flow(vlm, image, world["prompt"])
    flow_result.save(out / "flow")
    figures += sorted(str(p.relative_to(out)) for p in (out / "flow").glob("*.png"))
    return figures


def _html(report: dict[str, Any], n_images: int) -> str:
    esc = html.escape
    rows = []
    for i in range(n_images):
        cells = "".join(f"<td>{esc(caps[i])}</td>" for caps in report["captions"].values())
        rows.append(f"<tr><td><img src='scene{i}.png' width='128'></td>{cells}</tr>")
    head = "".join(f"<th>{esc(n)}</th>" for n in report["captions"])
    metric_rows = ""
    if report["metrics"]:
        keys = sorted({k for m in report["metrics"].values() for k in m})
        metric_rows = "<h2>Metrics</h2><table><tr><th>method</th>" + "".join(f"<th>{esc(k)}</th>" for k in keys)
        metric_rows += "</tr>" + "".join(
            "<tr><td>" + esc(n) + "</td>" + "".join(
                f"<td>{m.get(k, ''):.3g}</td>" if isinstance(m.get(k), float) else f"<td>{m.get(k, '')}</td>"
                for k in keys) + "</tr>" for n, m in report["metrics"].items()) + "</table>"
    figs = "".join(f"<figure><img src='{esc(f)}' width='420'><figcaption>{esc(f)}</figcaption></figure>"
                   for f in report["figures"])
    return f"""<!doctype html><meta charset="utf-8"><title>vlmscope demo</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}
table{{border-collapse:collapse}} figure{{display:inline-block}}</style>
<h1>vlmscope demo — {esc(report['model'])}</h1><p>{esc(report['note'])}</p>
<p>Prompt: <code>{esc(report['prompt'])}</code> · {report['seconds']} s on CPU</p>
<h2>Captions</h2><table><tr><th>image</th>{head}</tr>{''.join(rows)}</table>{metric_rows}
<h2>Attention and information flow</h2>{figs}"""
