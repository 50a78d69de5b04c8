"""The issue-18 methods on the other families (LLaVA-NeXT, Qwen2-VL with M-RoPE) and in `vlmscope methods`.

Oracle on the families: each input of a left-padded batch decodes as when it runs alone (so prompts rebuilt for
branches, image spans and per-row state line up with the family's batching), and the method changes the output.
The stock-forward oracles of every method run on LLaVA in tests/test_methods_<name>.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from methods_oracle import IMAGES, PROMPTS, generate

from vlmscope.api import VLM

SPECS = ["icd:alpha=2", "icd:alpha=2,placement=after_image", "m3id:lam=1", "dola:layers=[0,1]",
         "deco:start=0,alpha=3", "vista:lam=1,sla_start=0,sla_end=2", "vaf:alpha=5,start=0,end=2",
         "sid:keep=2,alpha=2,layer=1"]


@pytest.fixture(scope="module", params=["llava-next", "qwen2-vl"])
def family(request):
    from vlmscope.models.tiny import build_tiny

    model, processor = build_tiny(request.param)
    vlm = VLM(model, processor, f"tiny-{request.param}")
    return vlm, generate(vlm, None, n=4)


def test_batch_equals_inputs_alone_and_method_acts(family):
    vlm, plain = family
    changed = 0
    for spec in SPECS:
        batch = generate(vlm, spec, n=4)
        for row in range(2):
            alone = generate(vlm, spec, IMAGES[row:row + 1], PROMPTS[row:row + 1], n=4)[0]
            assert batch[row].token_ids == alone.token_ids, spec
            np.testing.assert_allclose(batch[row].scores, alone.scores, atol=2e-4, err_msg=spec)
        changed += [r.token_ids for r in batch] != [r.token_ids for r in plain]
    assert changed >= len(SPECS) - 1  # a tiny random model may keep one method's 4 tokens


def test_methods_lists_the_seven_with_parameters(capsys):
    from vlmscope.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for line in ["icd: alpha=1.0, beta=0.1, disturbance='confused', placement='system'",
                 "m3id: lam=0.02, t0=1, beta=0.1",
                 "dola: layers='high', divergence='reference', relative_top=0.1, premature_norm=False",
                 "deco: alpha=0.6, start=20, end=29, top_k=20, top_p=0.9",
                 "vista: lam=0.17, gamma=0.3, sla_start=25, sla_end=31, steer_start=0, steer_end=32",
                 "vaf: alpha=1.15, beta=0.95, start=9, end=15",
                 "sid: alpha=0.5, beta=0.1, layer=2, keep=100"]:
        assert line in out


@pytest.mark.parametrize("spec", ["icd:alpha=2", "m3id:lam=1", "dola:layers=[0,1,2]", "deco:start=1,alpha=3",
                                  "vista:lam=1,sla_start=1,sla_end=3", "vaf:alpha=5,start=0,end=3",
                                  "sid:keep=4,alpha=2"])
def test_one_spec_instance_serves_two_runs_at_once(tiny_llava, spec):
    """Hooks on shared modules act only in their own run's forwards: two interleaved runs and two threads
    sharing one spec instance give what each input gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from test_interventions import IMAGES as images
    from test_interventions import PROMPTS as prompts
    from test_interventions import _greedy_interleaved

    from vlmscope.interventions import INTERVENTIONS

    method = INTERVENTIONS.parse(spec)
    vlm = tiny_llava
    alone = [vlm.generate(im, p, max_new_tokens=4, interventions=[method]).token_ids
             for im, p in zip(images, prompts)]
    assert alone != [vlm.generate(im, p, max_new_tokens=4).token_ids for im, p in zip(images, prompts)]
    interleaved = _greedy_interleaved(vlm, method)
    for row in range(2):
        assert interleaved[row][: len(alone[row])] == alone[row]
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(lambda i: vlm.generate(images[i % 2], prompts[i % 2], max_new_tokens=4,
                                                        interventions=[method]).token_ids, range(4)))
    assert threaded == alone * 2
