"""Document functions of the vlmscope_tiny_yesno test task (images are files next to this module)."""

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    answer = results[0].strip().lower()
    return {"accuracy": float(answer.startswith(doc["answer"]))}
