"""The tiny model and the seeded cases every parity fixture is built on (shared by the tools and the tests).

Rebuilt bit-identically from a seed in transformers 5.x: `build_llava(seed=0)` with multi-head (not grouped)
attention, and images / prompts drawn from fixed seeds.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from vlmscope.api import VLM
from vlmscope.models.tiny import WORDS, build_llava

PROMPT_WORDS = [w for w in WORDS if w not in ("USER", "ASSISTANT", ":", "user", "assistant", "system")]


def build_parity_vlm() -> VLM:
    model, processor = build_llava(seed=0, text={"num_key_value_heads": 4})
    return VLM(model.eval(), processor, "tiny-llava-mha")


# LLaVA-1.5's geometry for the truncation reference, whose constants are hard-coded (SYS_LENGTH=36,
# IMAGE_TOKEN_LENGTH=576, AGG_LAYER=22): 24 decoder layers, a 192-pixel image in 8-pixel patches (576 image tokens),
# and a 33-word system message so that BOS + system + "USER :" puts the image at position 36.
SYSTEM_WORDS = ("a man and a woman are sitting on the left of a table with a cat . there is a dog near the car "
                "and a tree on the right of the man")
TRUNCATION_TEMPLATE = (
    SYSTEM_WORDS + " {% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_truncation_vlm() -> VLM:
    model, processor = build_llava(seed=0, image_size=192, patch_size=8,
                                   text={"num_key_value_heads": 4, "num_hidden_layers": 24})
    processor.chat_template = TRUNCATION_TEMPLATE
    return VLM(model.eval(), processor, "tiny-llava-mha-24l-576")


PARITY_MODELS = {"default": (build_parity_vlm, 32), "truncation": (build_truncation_vlm, 192)}


def case_image(index: int, size: int = 32) -> Image.Image:
    pixels = np.random.RandomState(1000 + index).rand(size, size, 3) * 255
    return Image.fromarray(pixels.astype("uint8"))


def case_prompt(index: int) -> str:
    rng = np.random.RandomState(2000 + index)
    return " ".join(rng.choice(PROMPT_WORDS, size=int(rng.randint(3, 9))))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes in name order: the fixture records it, the test checks the rebuild."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
