"""Shared fixtures: tiny offline models, the embedded shapes model, generated images.

Model fixtures are session-wide and must not be modified by a test; a test that changes weights or configs
builds its own model with `tiny_vlm(arch)` (a fresh, unshared one per call).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def nltk_data(tmp_path_factory: pytest.TempPathFactory) -> None:
    """NLTK's tagger and WordNet for the exact noun path (AMBER, CHAIR): installed from ../shared/data/nltk
    into a temporary folder when not already found; a failure under CI=true, a skip elsewhere."""
    from vlmscope.eval import nltk_backend

    if not nltk_backend.nltk_status().available:
        source = Path(os.environ.get("VLMSCOPE_SHARED_DIR") or SHARED) / "data" / "nltk"
        if not source.exists():
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{source} is missing: CI must provide ../shared/data beside the repository")
            pytest.skip(f"{source} not present (CI provides it beside the repository)")
        dest = tmp_path_factory.mktemp("nltk_data")
        nltk_backend.install_data(source, dest)
        os.environ["NLTK_DATA"] = str(dest)  # for CLI and lmms-eval subprocesses
    assert nltk_backend.nltk_status().available


def make_image(seed: int, width: int = 48, height: int = 40):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # Tiny matrices: thread hand-offs cost more than they save on a shared 2-core machine (about 50x there).
    # scripts/test.sh also sets OMP_NUM_THREADS=1; this covers a bare `pytest` run.
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def images():
    return [make_image(0, 48, 40), make_image(1, 40, 64)]


@pytest.fixture(scope="session")
def tiny_llava():
    import vlmscope

    return vlmscope.load("tiny-llava", device="cpu")


@pytest.fixture(scope="session")
def tiny_llava_next():
    import vlmscope

    return vlmscope.load("tiny-llava-next", device="cpu")


@pytest.fixture(scope="session")
def tiny_qwen2_vl():
    import vlmscope

    return vlmscope.load("tiny-qwen2-vl", device="cpu")


@pytest.fixture(scope="session")
def shapes_vlm():
    import vlmscope

    return vlmscope.load("shapes", device="cpu")


@pytest.fixture
def tiny_vlm():
    """`tiny_vlm("llava" | "llava-next" | "qwen2-vl")`: a freshly built tiny model this test may change."""
    from vlmscope.api import VLM
    from vlmscope.models.tiny import build_tiny

    def build(arch: str = "llava") -> VLM:
        model, processor = build_tiny(arch)
        return VLM(model, processor, f"tiny-{arch}")

    return build


@pytest.fixture(scope="session")
def image_file(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("img") / "image.png"
    images[0].save(path)
    return path
