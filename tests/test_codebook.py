"""Redundancy codebook: pruning at the projector output, and codebook construction.

Oracles: plain numpy for the selection rules, stock transformers (`generate` / forward with the kept features
passed as `mm_encoder_outputs`, forward hooks on the projector) for the compacted prompts and the probes,
hand computation for the divergence, synthetic blobs for DPC-KNN.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlmscope
from vlmscope.cli import main as cli_main
from vlmscope.codebook import dpc_knn, load_codebook, reference_divergence, textbook_jsd, top1_probability
from vlmscope.codebook.build import (
    BuildSettings,
    Prober,
    analyse_image,
    build_codebook,
    neighbourhood,
    parts_path,
)
from vlmscope.codebook.features import span_layout
from vlmscope.decoding import DECODINGS
from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError, VlmscopeError
from vlmscope.interventions import INTERVENTIONS
from vlmscope.interventions.codebook import CodebookPruning

PROMPTS = ["describe this", "what is in the image ?"]


def _image(seed: int, size: tuple[int, int] = (60, 40)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def llava():
    return vlmscope.load("tiny-llava")


@pytest.fixture(scope="module")
def llava_next():
    return vlmscope.load("tiny-llava-next")


@pytest.fixture(scope="module")
def codebook_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cb") / "random.pt"
    torch.save(torch.randn(24, 64, generator=torch.Generator().manual_seed(1)).half(), path)
    return path


def _images(vlm):
    # LLaVA-NeXT: two aspect ratios, so the rows have different image-token counts.
    return [_image(0), _image(1, (40, 72) if vlm.adapter.family == "llava_next" else (60, 40))]


def _stock_features(vlm, images):
    """Per image: the stock projector output (numpy) and the span indices of its grid tokens."""
    batch = vlm.encode(images, PROMPTS[: len(images)])
    with torch.no_grad():
        out = vlm.model.get_image_features(**{k: v for k, v in batch.model_inputs.items()})
    feats = [f.float().numpy() for f in out.pooler_output]
    contents = [span_layout(vlm.adapter, batch, row).content for row in range(len(images))]
    return batch, feats, contents


def _numpy_scores(x, c, score="max_cosine"):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    s = x @ c.T
    if score == "max_cosine":
        return s.max(axis=1)

    def softmax(a, axis):
        e = np.exp(a - a.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    if score == "single_softmax":
        return softmax(s, 1).max(axis=1)
    return (softmax(s, 0) * softmax(s, 1)).max(axis=1)


def _numpy_keep(scores, threshold=None, keep_ratio=None, score="max_cosine"):
    n = len(scores)
    if threshold is not None:
        return scores < threshold
    keep = np.zeros(n, bool)
    if score == "max_cosine":
        keep[np.argsort(scores, kind="stable")[: round(n * keep_ratio)]] = True
        return keep
    k = round(n * (1 - keep_ratio))
    return scores < np.sort(scores)[::-1][k - 1] if k > 0 else ~keep


def _generate(vlm, images, intervention=None, max_new_tokens=5):
    return vlm.generate(images, PROMPTS[: len(images)], max_new_tokens=max_new_tokens,
                        interventions=[intervention] if intervention is not None else None)


def _keep_masks(vlm, images, intervention):
    """The per-row keep masks of one run (they live in the run's state, not on the spec)."""
    batch = vlm.encode(images, PROMPTS[: len(images)])
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, [intervention]) as run:
        return run.state(intervention).keep_masks


def _hooks(model):
    # transformers installs its own output-capturing hooks lazily on a first call: compare, do not expect none.
    return {name: (tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()))
            for name, m in model.named_modules()}


def _model_state(vlm):
    vlm.generate(_image(0), PROMPTS[0], max_new_tokens=1)  # a stock call first (lazy hooks above)
    model = vlm.model
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, _hooks(model),
            model.config._attn_implementation, model.training)


def _assert_state(vlm, before):
    params, hooks, attn, training = before
    after = vlm.model.state_dict()
    assert params.keys() == after.keys()
    assert all(torch.equal(params[k], after[k]) for k in params)
    assert _hooks(vlm.model) == hooks
    assert vlm.model.config._attn_implementation == attn and vlm.model.training == training


# --- selection ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_selection_equals_numpy_rule(arch, llava, llava_next, codebook_file):
    vlm = llava if arch == "llava" else llava_next
    images = _images(vlm)
    _, feats, contents = _stock_features(vlm, images)
    prototypes = torch.load(codebook_file).float().numpy()
    scores = [_numpy_scores(f[c], prototypes) for f, c in zip(feats, contents)]
    threshold = float(np.median(np.concatenate(scores)))
    cases = [dict(threshold=threshold), dict(keep_ratio=0.5), dict(keep_ratio=0.25),
             dict(keep_ratio=0.3, score="double_softmax"), dict(keep_ratio=0.6, score="single_softmax")]
    for params in cases:
        intervention = CodebookPruning(path=str(codebook_file), **params)
        keep_masks = _keep_masks(vlm, images, intervention)
        score = params.get("score", "max_cosine")
        for row, (f, c) in enumerate(zip(feats, contents)):
            expected = _numpy_keep(_numpy_scores(f[c], prototypes, score), params.get("threshold"),
                                   params.get("keep_ratio"), score)
            assert 0 < expected.sum() < len(expected)
            np.testing.assert_array_equal(keep_masks[row].numpy(), expected, err_msg=str(params))


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_kept_counts_fed_and_reported(arch, llava, llava_next, codebook_file):
    vlm = llava if arch == "llava" else llava_next
    images = _images(vlm)
    intervention = CodebookPruning(path=str(codebook_file), keep_ratio=0.25)
    results = _generate(vlm, images, intervention)
    keep_masks = _keep_masks(vlm, images, intervention)
    batch, _, contents = _stock_features(vlm, images)
    separators = 1 if arch == "llava_next" else 0  # one image_newline closes the flattened list
    for row, result in enumerate(results):
        kept = round(len(contents[row]) * 0.25)
        assert int(keep_masks[row].sum()) == kept
        assert result.image_tokens == kept + separators
        assert result.image_tokens < int(batch.image_mask[row].sum())
    # What the language model saw: the KV cache holds exactly the compacted prompt.
    batch = vlm.encode(images, PROMPTS)
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, [intervention]) as run:
        run.prefill()
        assert run.cache.get_seq_length() == run.prompt_len == run.batch.input_ids.shape[1]
        assert run.image_tokens == [r.image_tokens for r in results]
        text_tokens = (batch.attention_mask.sum(1) - batch.image_mask.sum(1)).tolist()
        assert run.prompt_len == max(t + n for t, n in zip(text_tokens, run.image_tokens))


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_threshold_above_one_is_the_baseline(arch, llava, llava_next, codebook_file):
    vlm = llava if arch == "llava" else llava_next
    images = _images(vlm)
    baseline = _generate(vlm, images, max_new_tokens=8)
    pruned = _generate(vlm, images, CodebookPruning(path=str(codebook_file), threshold=1.01), max_new_tokens=8)
    for a, b in zip(baseline, pruned):
        assert a.token_ids == b.token_ids
        assert a.image_tokens == b.image_tokens
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_compacted_prompt_matches_stock_model(positions, llava, codebook_file):
    """Stock forward/generate fed the compacted ids with the kept features (mm_encoder_outputs) agree with ours."""
    vlm = llava
    image = [_image(3)]
    intervention = CodebookPruning(path=str(codebook_file), keep_ratio=0.5, positions=positions)
    batch = vlm.encode(image, PROMPTS[:1])
    with torch.no_grad(), GenerationRun(vlm.model, vlm.adapter, batch, [intervention]) as run:
        ours = run.prefill()
    keep = run.state(intervention).keep_masks[0]
    feats = vlm.model.get_image_features(pixel_values=batch.model_inputs["pixel_values"]).pooler_output[0]
    ids, mask = batch.input_ids[0], batch.image_mask[0]
    start, end = int(mask.nonzero()[0]), int(mask.nonzero()[-1]) + 1
    kept_ids = torch.cat([ids[:start], ids[start:end][keep], ids[end:]])[None]
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=[feats[keep]])}
    stock_positions = None
    if positions == "original":
        full = torch.arange(len(ids))
        stock_positions = torch.cat([full[:start], full[start:end][keep], full[end:]])[None]
    with torch.no_grad():
        stock = vlm.model(input_ids=kept_ids, attention_mask=torch.ones_like(kept_ids),
                          position_ids=stock_positions, mm_encoder_outputs=encoded).logits[:, -1]
    torch.testing.assert_close(ours, stock.float(), atol=1e-4, rtol=1e-4)
    if positions == "contiguous":
        ours_tokens = _generate(vlm, image, intervention, max_new_tokens=8)[0].token_ids
        stock_tokens = vlm.model.generate(
            input_ids=kept_ids, attention_mask=torch.ones_like(kept_ids), mm_encoder_outputs=encoded,
            do_sample=False, max_new_tokens=8, pad_token_id=vlm.adapter.tokenizer.pad_token_id,
        )[0, kept_ids.shape[1]:].tolist()
        assert ours_tokens == stock_tokens[: len(ours_tokens)]


@pytest.mark.parametrize("arch", ["llava", "llava_next"])
def test_batch_of_two_equals_each_alone(arch, llava, llava_next, codebook_file):
    vlm = llava if arch == "llava" else llava_next
    images = _images(vlm)
    _, feats, contents = _stock_features(vlm, images)
    prototypes = torch.load(codebook_file).float().numpy()
    # A threshold between the rows' medians keeps different counts per row: the rows are re-padded.
    medians = [np.median(_numpy_scores(f[c], prototypes)) for f, c in zip(feats, contents)]
    for params in (dict(threshold=float(np.mean(medians))), dict(keep_ratio=0.5)):
        batched = _generate(vlm, images, CodebookPruning(path=str(codebook_file), **params), max_new_tokens=8)
        if "threshold" in params:
            assert batched[0].image_tokens != batched[1].image_tokens
        for row, image in enumerate(images):
            alone = vlm.generate(image, PROMPTS[row], max_new_tokens=8,
                                 interventions=CodebookPruning(path=str(codebook_file), **params))
            assert alone.token_ids == batched[row].token_ids
            assert alone.image_tokens == batched[row].image_tokens
            np.testing.assert_allclose(alone.scores, batched[row].scores, atol=1e-4)


def test_beam_search_with_codebook(llava, codebook_file):
    intervention = CodebookPruning(path=str(codebook_file), keep_ratio=0.5)
    result = llava.generate(_image(0), PROMPTS[0], max_new_tokens=5, interventions=intervention,
                            decoding=DECODINGS.create("beam", {"num_beams": 3}))
    assert result.image_tokens == 8 and result.token_ids


# --- codebook files and errors -----------------------------------------------------------------------------
def test_published_format_loads(tmp_path, llava):
    path = tmp_path / "coco_train_500samples_numPrototypes-7.pt"
    tensor = torch.randn(7, 64).half()
    torch.save(tensor, path)
    (tmp_path / "coco_train_500samples_numPrototypes-7.json").write_text(json.dumps([9, 9, 12, 5, 9, 1, 2]))
    codebook = load_codebook(path)
    assert codebook.size == 7 and codebook.width == 64 and codebook.prototypes.dtype == torch.float16
    assert torch.equal(codebook.prototypes, tensor)
    assert codebook.meta == {"sources": [9, 9, 12, 5, 9, 1, 2]}
    result = llava.generate(_image(0), PROMPTS[0], max_new_tokens=3,
                            interventions=f"codebook:path={path},keep_ratio=0.25")
    assert result.image_tokens == 4


def test_bad_codebook_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_codebook(tmp_path / "missing.pt")
    torch.save(torch.randn(10), tmp_path / "flat.pt")
    with pytest.raises(InputError, match=r"shape \(10,\)"):
        load_codebook(tmp_path / "flat.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a tensor")
    with pytest.raises(InputError, match="cannot read codebook"):
        load_codebook(tmp_path / "junk.pt")


def test_spec_parsing_and_parameter_errors(codebook_file):
    made = INTERVENTIONS.parse(f"codebook:path={codebook_file},keep_ratio=0.25")
    assert isinstance(made, CodebookPruning) and made.keep_ratio == 0.25 and made.threshold is None
    made = INTERVENTIONS.from_config({"name": "codebook", "path": str(codebook_file), "threshold": "0.45"})
    assert made.threshold == 0.45
    with pytest.raises(InputError, match="exactly one"):
        INTERVENTIONS.parse(f"codebook:path={codebook_file}")
    with pytest.raises(InputError, match="exactly one"):
        INTERVENTIONS.parse(f"codebook:path={codebook_file},threshold=0.4,keep_ratio=0.5")
    with pytest.raises(InputError, match="within"):
        INTERVENTIONS.parse(f"codebook:path={codebook_file},keep_ratio=1.5")
    with pytest.raises(InputError, match="path"):
        INTERVENTIONS.parse("codebook:threshold=0.4")


def test_width_mismatch_is_one_line_error_and_model_untouched(tmp_path, llava):
    path = tmp_path / "wide.pt"
    torch.save(torch.randn(5, 4096).half(), path)
    before = _model_state(llava)
    with pytest.raises(InputError, match="width 4096.*width 64") as info:
        llava.generate(_image(0), PROMPTS[0], max_new_tokens=2, interventions=f"codebook:path={path},threshold=0.4")
    assert "\n" not in str(info.value)
    _assert_state(llava, before)


def test_model_state_untouched(llava_next, codebook_file):
    before = _model_state(llava_next)
    _generate(llava_next, _images(llava_next), CodebookPruning(path=str(codebook_file), keep_ratio=0.5))
    _assert_state(llava_next, before)


def test_unsupported_family(codebook_file):
    vlm = vlmscope.load("tiny-qwen2-vl")
    with pytest.raises(VlmscopeError, match="LLaVA-1.5 and LLaVA-NeXT"):
        vlm.generate(_image(0), PROMPTS[0], max_new_tokens=1,
                     interventions=CodebookPruning(path=str(codebook_file), keep_ratio=0.5))


# --- construction pieces -----------------------------------------------------------------------------------
def test_divergence_against_hand_computation():
    a = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -9.0, -9.5])
    b = torch.tensor([1.0, 1.5, 0.5, 0.2, -0.5, -2.0, -1.5, -1.0, -2.5, -4.0, 50.0, 40.0])
    # B's two largest logits sit outside A's top 10 (ids 10, 11): the reference ignores them.
    top = list(range(10))

    def softmax(values):
        exps = [math.exp(v) for v in values]
        return [e / sum(exps) for e in exps]

    p = softmax([float(a[i]) for i in top])
    q = softmax([float(b[i]) for i in top])
    m = [(x + y) / 2 for x, y in zip(p, q)]
    kl_mp = sum(mi * math.log(mi / pi) for mi, pi in zip(m, p)) / 10
    kl_mq = sum(mi * math.log(mi / qi) for mi, qi in zip(m, q)) / 10
    expected = 0.5 * (kl_mp + kl_mq)
    assert float(reference_divergence(a, b)) == pytest.approx(expected, rel=1e-5)
    textbook = 0.5 * (sum(x * math.log(x / y) for x, y in zip(p, m)) + sum(x * math.log(x / y) for x, y in zip(q, m)))
    assert float(textbook_jsd(a, b)) == pytest.approx(textbook, rel=1e-5)
    assert expected != pytest.approx(textbook, rel=1e-2)
    batched = reference_divergence(torch.stack([a, a]), torch.stack([b, a]))
    assert float(batched[0]) == pytest.approx(expected, rel=1e-5) and float(batched[1]) == pytest.approx(0, abs=1e-9)
    # p_top1: the top-1 probability renormalised over the 3 largest logits.
    e = [math.exp(v) for v in (2.0, 1.0, 0.5)]
    assert float(top1_probability(a, 3)) == pytest.approx(e[0] / sum(e), rel=1e-6)


def test_dpc_knn_recovers_separated_clusters():
    rng = np.random.RandomState(0)
    centres = rng.randn(4, 16) * 20
    sizes = [12, 20, 7, 15]
    truth = np.repeat(np.arange(4), sizes)
    x = np.concatenate([c + rng.randn(n, 16) * 0.5 for c, n in zip(centres, sizes)])
    order = rng.permutation(len(x))
    labels, centre_idx = dpc_knn(torch.from_numpy(x[order]).float(), 4, k=5, seed=3)
    labels, truth = labels.numpy(), truth[order]
    assert sorted(truth[centre_idx.numpy()].tolist()) == [0, 1, 2, 3]  # one centre per blob
    for cluster in range(4):  # the partition equals the truth up to relabelling
        assert len(set(truth[labels == cluster])) == 1
        assert (labels == cluster).sum() == sizes[truth[labels == cluster][0]]
    again, _ = dpc_knn(torch.from_numpy(x[order]).float(), 4, k=5, seed=3)
    assert np.array_equal(again.numpy(), labels)
    few, _ = dpc_knn(torch.randn(3, 4), 8)  # more clusters than points: clamped
    assert sorted(few.tolist()) == [0, 1, 2]


def test_neighbourhood_windows(llava):
    batch = llava.encode([_image(0)], PROMPTS[:1])
    layout = span_layout(llava.adapter, batch, 0)  # 4×4 grid
    assert neighbourhood(layout, "image", 0, 0).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert neighbourhood(layout, "image", 3, 3).tolist() == [5, 6, 7, 9, 10, 11, 13, 14, 15]
    assert neighbourhood(layout, "image", 1, 2).tolist() == [1, 2, 3, 5, 6, 7, 9, 10, 11]


def _stock_first_logits(vlm, batch, encoded=None, span=None, hook=None, extra_token=None):
    """Last-position logits of the stock model for the probe prompt with a replaced image span."""
    ids = batch.input_ids[0]
    mask = batch.image_mask[0]
    start, end = int(mask.nonzero()[0]), int(mask.nonzero()[-1]) + 1
    if span is not None:
        ids = torch.cat([ids[:start], ids.new_full((span,), int(ids[start])), ids[end:]])
    if extra_token is not None:
        ids = torch.cat([ids, ids.new_tensor([extra_token])])
    kwargs = {"mm_encoder_outputs": encoded} if encoded is not None else dict(batch.model_inputs)
    handle = vlm.model.model.multi_modal_projector.register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            return vlm.model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], **kwargs).logits[0, -1]
    finally:
        if handle is not None:
            handle.remove()


def test_probe_scores_match_stock_model(llava):
    settings = BuildSettings(top1_top_k=50)
    prober = Prober(llava, settings)
    image = _image(5)
    record = analyse_image(prober, image, "x.png")
    batch = llava.encode([image], [settings.prompt])
    feats = llava.model.get_image_features(pixel_values=batch.model_inputs["pixel_values"]).pooler_output[0]
    pad = llava.model.get_input_embeddings().weight[llava.adapter.tokenizer.pad_token_id]
    layout = span_layout(llava.adapter, batch, 0)
    for t in (0, 6):  # a corner token and an inner one
        single = _stock_first_logits(llava, batch, {"image": BaseModelOutputWithPooling(pooler_output=[feats[t:t + 1]])}, 1)
        assert record.p_top1[t] == pytest.approx(float(top1_probability(single, 50)), rel=1e-4)
        window = neighbourhood(layout, *record.locations[t])
        local_a = feats[window]
        local_b = local_a.clone()
        local_b[list(window).index(t)] = pad
        la, lb = (_stock_first_logits(llava, batch, {"image": BaseModelOutputWithPooling(pooler_output=[w])}, 9)
                  for w in (local_a, local_b))
        assert record.d_local[t] == pytest.approx(float(reference_divergence(la, lb)), rel=1e-3, abs=1e-9)

        def blank(module, args, output, window=window):
            output = output.clone()
            output[:, torch.as_tensor(window)] = pad
            return output

        ga, gb = _stock_first_logits(llava, batch), _stock_first_logits(llava, batch, hook=blank)
        assert record.d_global[t] == pytest.approx(float(reference_divergence(ga, gb)), rel=1e-3, abs=1e-9)
    # The low-information rule, recomputed from the stored scores.
    combined = np.array(record.d_local) + 16 * np.array(record.d_global)
    expected = (combined < settings.jsd_value_thres) & (np.array(record.p_top1) < settings.top1_prob_thres)
    assert record.low_info == expected.tolist()


def test_skip_first_token(llava):
    image = _image(5)
    plain = Prober(llava, BuildSettings(skip_first_token=None))
    batch = llava.encode([image], [plain.settings.prompt])
    feats = llava.model.get_image_features(pixel_values=batch.model_inputs["pixel_values"]).pooler_output[0]
    encoded = {"image": BaseModelOutputWithPooling(pooler_output=[feats[0:1]])}
    first = _stock_first_logits(llava, batch, encoded, 1)
    word = llava.adapter.tokenizer.convert_ids_to_tokens(int(first.argmax()))
    skipping = Prober(llava, BuildSettings(skip_first_token=word))
    assert skipping.skip_id == int(first.argmax())
    record = analyse_image(skipping, image, "x.png")
    second = _stock_first_logits(llava, batch, encoded, 1, extra_token=skipping.skip_id)
    assert record.p_top1[0] == pytest.approx(float(top1_probability(second, 50)), rel=1e-4)


# --- end-to-end build ---------------------------------------------------------------------------------------
# Permissive thresholds so a random tiny model yields prototypes from four images.
TINY_SETTINGS = dict(top1_prob_thres=1.1, jsd_value_thres=1e9, cluster_size_thres=3, prototype_cluster_nums=6,
                     prototype_min_unique_sample_thres=1, batch_size=8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    for i in range(4):
        _image(10 + i, (48 + 8 * i, 40)).save(directory / f"img{i}.png")
    (directory / "notes.txt").write_text("not an image")
    return directory


class _Stop(Exception):
    pass


def test_build_end_to_end_and_resume(tmp_path, image_dir, llava):
    settings = BuildSettings(**TINY_SETTINGS)
    fresh = build_codebook(llava, image_dir, tmp_path / "fresh" / "cb.pt", settings)
    assert fresh.images == 4 and fresh.computed == [f"img{i}.png" for i in range(4)]
    codebook = load_codebook(fresh.path)
    sidecar = codebook.meta
    assert codebook.prototypes.dtype == torch.float16 and codebook.width == 64
    assert codebook.size == fresh.prototypes == len(sidecar["prototypes"]) > 0
    assert sidecar["candidates"] == fresh.candidates >= fresh.prototypes
    assert {p["image"] for p in sidecar["prototypes"]} <= set(sidecar["images"])
    # Each prototype is the source token's post-projector feature.
    first = sidecar["prototypes"][0]
    batch = llava.encode([Image.open(image_dir / first["image"])], [settings.prompt])
    feats = llava.model.get_image_features(pixel_values=batch.model_inputs["pixel_values"]).pooler_output[0]
    torch.testing.assert_close(codebook.prototypes[0].float(), feats[first["span_index"]].half().float())
    assert first["span_index"] == first["row"] * 4 + first["col"]

    # Interrupted after two images, with a third record cut off mid-write: the restart analyses the rest only.
    out = tmp_path / "resumed" / "cb.pt"

    def stop_after_two(name):
        if name == "img1.png":
            raise _Stop

    with pytest.raises(_Stop):
        build_codebook(llava, image_dir, out, settings, on_image=stop_after_two)
    assert not out.exists()
    lines = parts_path(out).read_text().splitlines()
    assert len(lines) == 3
    full_record = json.loads(lines[2])
    cut = json.dumps({**full_record, "image": "img2.png"})[:200]
    with open(parts_path(out), "a") as handle:
        handle.write(cut)
    resumed = build_codebook(llava, image_dir, out, settings)
    assert resumed.computed == ["img2.png", "img3.png"]
    assert torch.equal(load_codebook(out).prototypes, codebook.prototypes)
    assert load_codebook(out).meta["prototypes"] == sidecar["prototypes"]
    # Global-stage settings may change on a resumed build; nothing is analysed again.
    again = build_codebook(llava, image_dir, out, BuildSettings(**{**TINY_SETTINGS, "prototype_cluster_nums": 2}))
    assert again.computed == []
    # The built codebook prunes.
    result = llava.generate(_image(0), PROMPTS[0], max_new_tokens=2,
                            interventions=f"codebook:path={out},keep_ratio=0.5")
    assert result.image_tokens == 8
    # Per-image settings may not change under the same side store.
    with pytest.raises(InputError, match="other per-image settings"):
        build_codebook(llava, image_dir, out, BuildSettings(**{**TINY_SETTINGS, "jsd_value_thres": 1.0}))


def test_build_llava_next_and_num_images(tmp_path, image_dir, llava_next):
    settings = BuildSettings(**{**TINY_SETTINGS, "prototype_min_unique_sample_thres": 0})
    result = build_codebook(llava_next, image_dir, tmp_path / "next.pt", settings, num_images=1)
    assert result.images == 1 and result.prototypes == result.candidates > 0
    meta = load_codebook(result.path).meta
    assert {p["grid"] for p in meta["prototypes"]} <= {"base", "tiles"}


def test_build_without_prototypes_is_an_error(tmp_path, image_dir, llava):
    settings = BuildSettings(**{**TINY_SETTINGS, "prototype_min_unique_sample_thres": 64})
    with pytest.raises(VlmscopeError, match="no prototype survived"):
        build_codebook(llava, image_dir, tmp_path / "cb.pt", settings, num_images=1)


def test_build_cli_and_bad_input(tmp_path, image_dir, capsys):
    out = tmp_path / "cli.pt"
    args = ["codebook", "build", "--model", "tiny-llava", "--images", str(image_dir), "--out", str(out),
            "--num-images", "2", "--top1-prob-thres", "1.1", "--jsd-value-thres", "1e9", "--cluster-size-thres",
            "3", "--prototype-min-unique", "1", "--prototype-cluster-nums", "4", "--no-progress", "--json"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 2 and summary["prototypes"] == load_codebook(out).size
    assert cli_main(["codebook", "info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["width"] == 64

    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    for directory, message in ((tmp_path / "missing", "image directory not found"), (empty, "no images"),
                               (corrupt, "cannot read image")):
        code = cli_main(["codebook", "build", "--model", "tiny-llava", "--images", str(directory),
                         "--out", str(tmp_path / "x.pt"), "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_side_store_survives_a_cut_header(tmp_path):
    from vlmscope.codebook.build import PartsStore

    path = tmp_path / "cb.pt.parts.jsonl"
    path.write_text('{"kind":"header","form')
    store = PartsStore(path, {"model": "m", "width": 4, "settings": {}})
    assert store.records == {}
    assert json.loads(path.read_text().splitlines()[0])["model"] == "m"
