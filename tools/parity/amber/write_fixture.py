"""Parse the reference's printed AMBER metrics (zero.txt, table.txt, lenient.txt) into reference.json.

Usage: python tools/parity/amber/write_fixture.py WORK_DIR OUT.json --commit SHA --nltk VERSION
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RUNS = {
    "zero": "responses.json, spaCy stand-in with every similarity 0.0 (= vlmscope's skipped step)",
    "table": "responses.json, spaCy stand-in reading similarity_table.json",
    "lenient": "responses_lenient.json (answers normalised by the lenient parser), similarities 0.0",
}


def parse_printed(text: str) -> dict[str, dict[str, float]]:
    """``{section: {metric: value}}`` from the reference's ``print`` output ("CHAIR:\\t\\t 7.8", headers "X:")."""
    sections: dict[str, dict[str, float]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, value = line.partition(":")
        if not value.strip():
            current = sections.setdefault(name.strip(), {})
        else:
            assert current is not None, line
            current[name.strip()] = float(value.strip())
    return sections


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--nltk", required=True)
    args = ap.parse_args()
    runs = {}
    for name, what in RUNS.items():
        text = (args.work / f"{name}.txt").read_text(encoding="utf-8")
        runs[name] = {"inputs": what, "printed": text, "metrics": parse_printed(text)}
    payload = {"reference": "junyangwang0410/AMBER inference.py --evaluation_type a", "commit": args.commit,
               "nltk": args.nltk, "sentence_splitter": "untrained PunktSentenceTokenizer()", "runs": runs}
    args.out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
