"""Information flow against independent autograd on the stock eager model, hand-known shares, CLI, cleanup."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlmscope.api import VLM
from vlmscope.attention.engine import _text_config_names, active_plan
from vlmscope.cli import main as cli_main
from vlmscope.errors import InputError
from vlmscope.explain.flow import GROUPS, MAIN_FLOWS, build_inputs, flow

PROMPT = "what is in the image ?"
ANSWER = "a red ball on the table"


def make_image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(40, 56, 3) * 255).astype("uint8"))


@pytest.fixture
def llava(tiny_llava: VLM) -> VLM:
    return tiny_llava  # the shared session model (conftest); tests that change a model build their own


def stock_reference(vlm: VLM, image: Image.Image, answer_ids: list[int]) -> dict:
    """Stock eager forward on prompt + answer with output_attentions / hidden states and plain autograd."""
    model = vlm.model
    batch = vlm.encode([image], [PROMPT])
    prompt_len = batch.input_ids.shape[1]
    ids = torch.cat([batch.input_ids, torch.tensor([answer_ids])], dim=1)
    target = torch.tensor(answer_ids)
    answer_len = len(answer_ids)
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **batch.model_inputs,
                    output_attentions=True, output_hidden_states=True)
        for a in out.attentions:
            a.retain_grad()
        logits = out.logits[0, prompt_len - 1: prompt_len - 1 + answer_len].float()
        loss = -torch.log_softmax(logits, -1)[torch.arange(answer_len), target].sum()
        loss.backward(retain_graph=True)
        saliency = [(a * a.grad).sum(1)[0].abs().detach().double().numpy() for a in out.attentions]
        probs = [a.detach()[0].double().numpy() for a in out.attentions]
        # CAM oracle: outputs of layers 0..L-2 are hidden_states[1..L-1] (the last entry is after the norm).
        hidden = out.hidden_states[1:-1]
        z = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(z, hidden)
    finally:
        model.set_attn_implementation("sdpa")
        model.zero_grad(set_to_none=True)
    positions = batch.image_mask[0].nonzero().flatten()
    cams = [torch.relu(h[0, positions] @ g[0, positions].mean(0)).detach().double().numpy()
            for h, g in zip(hidden, grads)]
    start, end = int(positions[0]), int(positions[-1]) + 1
    return {"saliency": saliency, "probs": probs, "cams": cams, "P": prompt_len, "T": ids.shape[1],
            "groups": {"prefix": range(0, start), "image": range(start, end), "instruction": range(end, prompt_len),
                       "output": range(prompt_len, ids.shape[1]),
                       "target": range(prompt_len - 1, ids.shape[1] - 1)}}


def pair_mean(values: np.ndarray, dst: range, src: range) -> tuple[float, float]:
    pairs = [(i, j) for i in dst for j in src if j < i]
    total = sum(values[i, j] for i, j in pairs)
    return total / len(pairs), total


def test_saliency_shares_and_cam_equal_stock_autograd(llava: VLM) -> None:
    image = make_image()
    result = flow(llava, image, PROMPT, answer=ANSWER, chunk_size=3)
    ref = stock_reference(llava, image, result.answer_ids)
    groups = ref["groups"]
    assert result.groups == {g: [groups[g].start, groups[g].stop] for g in GROUPS}
    for layer in range(4):
        values = ref["saliency"][layer]
        everything = np.tril(values, -1).sum()
        for key in (*MAIN_FLOWS, "image->target", "instruction->target", "prefix->output"):
            src, dst = key.split("->")
            mean, total = pair_mean(values, groups[dst], groups[src])
            assert result.saliency[key][layer] == pytest.approx(mean, rel=1e-4, abs=1e-9), key
            assert result.saliency_total[key][layer] == pytest.approx(total, rel=1e-4, abs=1e-9), key
            assert result.saliency_share[key][layer] == pytest.approx(total / everything, rel=1e-4, abs=1e-9)
        rows = ref["probs"][layer].mean(0)[groups["target"]]  # [A, T], head mean of the predicting rows
        for g in GROUPS:
            expected = rows[:, groups[g].start: groups[g].stop].sum(1).mean()
            assert result.attention_shares[g][layer] == pytest.approx(expected, abs=1e-6)
        assert sum(result.attention_shares[g][layer] for g in GROUPS) == pytest.approx(1.0, abs=1e-5)
    raw = result.cam_maps(normalized=False).reshape(4, -1)
    for layer in range(3):
        np.testing.assert_allclose(raw[layer], ref["cams"][layer], rtol=1e-4, atol=1e-6)
    # The last layer's image positions feed no answer logit: zero gradient, zero map.
    assert np.all(raw[3] == 0)
    assert np.allclose(result.cam_maps().max(axis=(1, 2))[:3], 1.0)


def test_chunk_size_does_not_change_results_and_layers_run_chunk_by_chunk(llava: VLM) -> None:
    seen: list[list[int]] = []

    def record(module, args, output):
        plan = active_plan()
        if plan is not None:
            seen.append(sorted(layer for layer, ops in plan.layers.items() if ops.retain_grad))

    handle = llava.model.get_decoder().layers[0].register_forward_hook(record)
    try:
        by_two = flow(llava, make_image(), PROMPT, answer=ANSWER, chunk_size=2, cam=None)
    finally:
        handle.remove()
    assert seen == [[0, 1], [2, 3]]
    assert by_two.runtime["saliency_passes"] == 2 and by_two.cam == {}
    whole = flow(llava, make_image(), PROMPT, answer=ANSWER, chunk_size=4, cam=None)
    assert whole.runtime["saliency_passes"] == 1
    for key in by_two.saliency:
        np.testing.assert_allclose(by_two.saliency[key], whole.saliency[key], rtol=1e-5, atol=1e-10)
    subset = flow(llava, make_image(), PROMPT, answer=ANSWER, layers="1,3", chunk_size=1, cam=None)
    assert subset.layers == [1, 3]
    np.testing.assert_allclose(subset.saliency["image->output"],
                               [whole.saliency["image->output"][1], whole.saliency["image->output"][3]], rtol=1e-5)


def test_uniform_attention_gives_the_known_shares(tiny_vlm) -> None:
    vlm = tiny_vlm("llava")
    with torch.no_grad():
        vlm.model.get_decoder().layers[2].self_attn.q_proj.weight.zero_()
    result = flow(vlm, make_image(), PROMPT, answer=ANSWER, cam=None)
    prompt_len = len(result.prompt_ids)
    answer_len = len(result.answer_ids)
    for g in GROUPS:
        lo, hi = result.groups[g]
        # Row i attends uniformly to keys 0..i: the group's share is |group ∩ [0, i]| / (i + 1).
        rows = range(prompt_len - 1, prompt_len - 1 + answer_len)
        expected = np.mean([max(0, min(hi, i + 1) - lo) / (i + 1) for i in rows])
        assert result.attention_shares[g][2] == pytest.approx(expected, abs=1e-6)


def test_generated_answer_and_coded_cam(llava: VLM) -> None:
    generated = llava.generate(make_image(), PROMPT, max_new_tokens=4)
    result = flow(llava, make_image(), PROMPT, max_new_tokens=4, cam="coded")
    eos = llava.adapter.tokenizer.eos_token_id
    assert result.answer_ids == [t for t in generated.token_ids if t != eos]
    assert not result.params["answer_given"] and "generate_seconds" in result.runtime
    normalized = result.cam_maps()
    assert result.cam["threshold"] == 0.5 and result.cam["feature"] == "post_attention_layernorm"
    assert np.all((normalized == 0) | (normalized >= 0.5)) and normalized.max() == pytest.approx(1.0)


def stock_cams(vlm: VLM, inputs, pixel_values: torch.Tensor | None = None) -> np.ndarray:
    """Described LLaVA-CAM by plain autograd on the stock model: heat [layers - 1, grid tokens] of the layer
    outputs hidden_states[1..L-1] at the image-grid positions (the adapter's grid layout, newlines left out)."""
    model = vlm.model
    batch = inputs.batch
    model_inputs = dict(batch.model_inputs)
    if pixel_values is not None:
        model_inputs["pixel_values"] = pixel_values
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **model_inputs,
                output_hidden_states=True)
    p, n = inputs.prompt_len, len(inputs.answer_ids)
    z = out.logits[0, p - 1: p - 1 + n].float().gather(1, torch.tensor(inputs.answer_ids)[:, None]).sum()
    hidden = out.hidden_states[1:-1]
    grads = torch.autograd.grad(z, hidden)
    model.zero_grad(set_to_none=True)
    start = int(batch.image_mask[0].nonzero()[0])
    positions = torch.as_tensor(np.concatenate([start + g.indices().ravel() for g in inputs.grids]))
    return np.stack([torch.relu(h[0, positions] @ g[0, positions].mean(0)).detach().double().numpy()
                     for h, g in zip(hidden, grads)])


@pytest.mark.parametrize("arch, shape", [("llava-next", (4, 4, 4)), ("qwen2-vl", (4, 2, 4))])
def test_next_and_qwen_cams_equal_stock_autograd(request, arch: str, shape: tuple[int, int, int]) -> None:
    vlm = request.getfixturevalue({"llava-next": "tiny_llava_next", "qwen2-vl": "tiny_qwen2_vl"}[arch])
    image = make_image()
    result = flow(vlm, image, PROMPT, answer=ANSWER, chunk_size=4)
    assert result.cam_maps().shape == shape
    inputs = build_inputs(vlm, vlm.encode([image], [PROMPT]), result.answer_ids)
    expected = stock_cams(vlm, inputs)
    raw = np.concatenate([result.cam_maps(g.name, normalized=False).reshape(4, -1) for g in result.grids], axis=1)
    np.testing.assert_allclose(raw[:3], expected, rtol=1e-4, atol=1e-6)
    assert raw[:3].max() > 0  # a map that is all zero would pass the comparison trivially
    for layer in range(4):
        assert sum(result.attention_shares[g][layer] for g in GROUPS) == pytest.approx(1.0, abs=1e-5)
    if arch == "llava-next":
        assert set(result.cam["grids"]) == {"base", "tiles"}


def test_smoothgrad_averages_the_clean_and_the_noisy_copies(llava: VLM) -> None:
    image, samples, sigma, seed = make_image(), 2, 0.3, 5
    result = flow(llava, image, PROMPT, answer=ANSWER, smooth_samples=samples, smooth_sigma=sigma, seed=seed)
    # Every pass counted: one saliency pass (4 layers, chunk 8), the clean CAM pass and two noisy ones.
    assert result.runtime["cam_passes"] == samples + 1
    assert result.runtime["forward_backward_passes"] == 1 + samples + 1
    inputs = build_inputs(llava, llava.encode([image], [PROMPT]), result.answer_ids)
    pixels = inputs.batch.model_inputs["pixel_values"]
    generator = torch.Generator().manual_seed(seed)  # the documented noise: N(0, sigma) from this generator
    copies = [stock_cams(llava, inputs)]
    for _ in range(samples):
        copies.append(stock_cams(llava, inputs, pixels + torch.randn(pixels.shape, generator=generator) * sigma))
    raw = result.cam_maps(normalized=False).reshape(4, -1)
    np.testing.assert_allclose(raw[:3], np.mean(copies, axis=0), rtol=1e-4, atol=1e-6)
    # The clean pass matters: the average without it differs.
    assert not np.allclose(raw[:3], np.mean(copies[1:], axis=0), rtol=1e-3, atol=1e-6)
    assert result.provenance["seed"] == seed and result.params["smooth_sigma"] == sigma


def test_qwen_saliency_equals_stock_autograd(tiny_qwen2_vl: VLM) -> None:
    vlm = tiny_qwen2_vl
    model = vlm.model
    image = make_image(1)
    result = flow(vlm, image, PROMPT, answer=ANSWER, cam=None)
    batch = vlm.encode([image], [PROMPT])
    inputs = build_inputs(vlm, batch, result.answer_ids)
    ids = inputs.batch.input_ids
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, attention_mask=inputs.batch.attention_mask, **inputs.batch.model_inputs,
                    output_attentions=True)
        for a in out.attentions:
            a.retain_grad()
        p, n = inputs.prompt_len, len(result.answer_ids)
        logits = out.logits[0, p - 1: p - 1 + n].float()
        (-torch.log_softmax(logits, -1)[torch.arange(n), torch.tensor(result.answer_ids)].sum()).backward()
    finally:
        model.set_attn_implementation("sdpa")
    lo, hi = result.groups["image"]
    for layer, a in enumerate(out.attentions):
        values = (a * a.grad).sum(1)[0].abs().detach().double().numpy()
        mean, _ = pair_mean(values, range(p, ids.shape[1]), range(lo, hi))
        assert result.saliency["image->output"][layer] == pytest.approx(mean, rel=1e-4, abs=1e-9)


def hook_state(vlm: VLM) -> list:
    # transformers keeps its own output-capturing hooks installed; ours must come and go.
    modules = [m for layer in vlm.adapter.decoder_layers() for m in (layer, layer.post_attention_layernorm)]
    return [(list(m._forward_pre_hooks), list(m._forward_hooks)) for m in modules]


def test_errors_and_state_restored_after_an_exception(llava: VLM) -> None:
    with pytest.raises(InputError, match="layer 4 is out of range"):
        flow(llava, make_image(), PROMPT, answer=ANSWER, layers="2-4")
    with pytest.raises(InputError, match="empty answer"):
        flow(llava, make_image(), PROMPT, answer="  ")
    with pytest.raises(InputError, match="chunk_size"):
        flow(llava, make_image(), PROMPT, answer=ANSWER, chunk_size=0)
    model = llava.model
    model.get_decoder().layers[3].mlp.up_proj.weight.requires_grad_(False)  # a mixed state must come back as is
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    hooks_before = hook_state(llava)
    handle = model.get_decoder().layers[3].register_forward_hook(explode)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with pytest.raises(RuntimeError, match="boom"):
            flow(llava, make_image(), PROMPT, answer=ANSWER, chunk_size=2)
    finally:
        handle.remove()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert hook_state(llava) == hooks_before
    assert active_plan() is None and _text_config_names(model) == {"text_config": "sdpa"}
    model.get_decoder().layers[3].mlp.up_proj.weight.requires_grad_(True)


def test_cli_writes_flow_json_and_plots(tmp_path, capsys) -> None:
    image_path = tmp_path / "img.png"
    make_image().save(image_path)
    out = tmp_path / "flow"
    code = cli_main(["flow", "--model", "tiny-llava", "--image", str(image_path), "--prompt", PROMPT,
                     "--answer", ANSWER, "--chunk-size", "2", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "run.json").read_text())
    assert data["kind"] == "flow" and data["provenance"]["model"] == "tiny-llava"
    assert set(data["attention_shares"]) == set(GROUPS)
    assert all(len(v) == 4 for v in data["saliency"].values())
    assert set(MAIN_FLOWS) <= set(data["saliency"])
    assert len(data["cam"]["grids"]["image"]["normalized"]) == 4
    assert data["answer"] == ANSWER and data["runtime"]["forward_backward_passes"] == 3
    assert (out / "flows.png").is_file() and (out / "cam.png").is_file()
    assert cli_main(["flow", "--model", "tiny-llava", "--image", str(image_path), "--prompt", PROMPT,
                     "--layers", "9", "--out", str(tmp_path / "bad")]) == 2
    assert "layer 9 is out of range" in capsys.readouterr().err
    assert math.isfinite(data["saliency"]["image->output"][0])
