"""Combine the exported cases and a reference runner's output into tests/data/parity/<method>/reference.json.

Usage (vlmscope's environment): python tools/parity/common/write_fixture.py METHOD WORKDIR REFERENCE_OUTPUT_JSON
    --repo OWNER/NAME --commit SHA
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_model import PARITY_MODELS, weights_digest  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def dumps(fixture: dict) -> str:
    """Indented JSON with every list of numbers on one line (one token sequence per line)."""
    text = json.dumps(fixture, indent=1)
    flat = re.compile(r"\[\s*([-0-9.eE+,\s]*?)\s*\]")
    return flat.sub(lambda m: json.dumps(json.loads(f"[{m.group(1)}]")), text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("workdir")
    parser.add_argument("reference_output")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--commit", required=True)
    args = parser.parse_args()
    meta = json.loads((Path(args.workdir) / "cases.json").read_text())
    reference = json.loads(Path(args.reference_output).read_text())
    builder = PARITY_MODELS[meta.get("model", "default")][0]
    fixture = {
        "reference": {"repo": args.repo, "commit": args.commit, "transformers": reference["transformers"],
                      "torch": reference["torch"]},
        "model": {"name": meta.get("model", "default"), "image_size": meta.get("image_size", 32),
                  "builder": f"tools/parity/common/parity_model.py:{builder.__name__}",
                  "weights_sha256": weights_digest(builder().model)},
        "max_new_tokens": reference["max_new_tokens"],
        **{key: reference[key] for key in ("embeds_max_abs_diff", "vis_ref") if key in reference},
        "eos_token_id": meta["eos_token_id"],
        "cases": [{k: c[k] for k in ("index", "prompt", "input_ids", "img_start", "img_end")} for c in meta["cases"]],
        "settings": reference["settings"],
    }
    out = ROOT / "tests" / "data" / "parity" / args.method / "reference.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(fixture))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
