"""Package boundaries: data flows one way (models → attention → decoding/interventions → explain → eval → cli),
one home for each shared piece (image suffixes, the text-model adapter)."""

from __future__ import annotations

import ast
from pathlib import Path

from PIL import Image

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vlmscope"

# Rank of each top-level part: a module may import parts of lower or equal rank only (same part: anything).
RANKS = {"errors": 0, "registry": 0, "images": 0, "provenance": 0, "results": 0, "models": 1, "attention": 2, "codebook": 2,
         "decoding": 3, "interventions": 4, "explain": 5, "eval": 6, "shapes": 7, "api": 8, "cli": 9,
         "__main__": 10, "integrations": 11}  # integrations: other tools' plug-ins, on top; nothing imports them


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package itself (its lazy `load` facade)


def _imports(path: Path) -> set[str]:
    """Every vlmscope module imported by `path`, function-level (lazy) imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vlmscope"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmscope"):
            found.add(node.module)
    return found


def test_imports_flow_one_way():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        source = rel.parts[0].removesuffix(".py")
        if source == "__init__":
            continue
        for module in _imports(path):
            target = _part(module)
            if target is None or target == source:
                continue
            if RANKS[target] > RANKS[source]:
                violations.append(f"{rel} imports {module}")
    assert not violations, violations


def test_text_adapter_lives_in_models():
    from vlmscope.decoding import opera
    from vlmscope.models.adapters import TextAdapter, text_batch

    assert TextAdapter.__module__ == text_batch.__module__ == "vlmscope.models.adapters"
    assert opera.TextAdapter is TextAdapter  # OPERA uses it, does not define it


def test_one_image_suffix_list_for_every_listing(tmp_path):
    from vlmscope.codebook.build import list_images
    from vlmscope.eval.coco import list_coco_images, parse_image_id
    from vlmscope.explain.heads import image_files
    from vlmscope.images import IMAGE_SUFFIXES

    names = ["COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.PNG", "COCO_val2014_000000000003.webp",
             "COCO_val2014_000000000004.bmp"]
    for name in names:
        Image.new("RGB", (4, 4)).save(tmp_path / name, format={"jpg": "JPEG"}.get(name.rsplit(".")[-1], None)
                                      or name.rsplit(".")[-1].upper())
    (tmp_path / "notes.txt").write_text("not an image")
    listed = {
        "heads": [p.name for p in image_files(tmp_path)],
        "codebook": [p.name for p in list_images(tmp_path)],
        "coco": list_coco_images(tmp_path),
    }
    assert all(v == sorted(names) for v in listed.values()), listed
    assert [parse_image_id(n) for n in sorted(names)] == [1, 2, 3, 4]
    assert {".jpg", ".png", ".webp", ".bmp"} <= set(IMAGE_SUFFIXES)
