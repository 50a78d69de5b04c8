"""One result protocol (run.json with kind and provenance, save/load/to_json, results.load) and the Python API
surface: real signatures, lists as in generate, short reprs, dir(vlmscope)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import vlmscope
from vlmscope.api import VLM
from vlmscope.cli import main as cli_main
from vlmscope.errors import InputError
from vlmscope.explain.flow import FlowResult, flow
from vlmscope.explain.heads import HeadRanking, rank_heads
from vlmscope.explain.maps import ExplainResult, explain
from vlmscope.results import EvalRun, load

PROMPT = "what is in the image ?"
ANSWER = "a red ball"


def make_image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(40, 56, 3) * 255).astype("uint8"))


def check_provenance(record: dict, decoding: str | None) -> None:
    # Oracle: the installed packages and the tiny model as loaded.
    assert record["versions"]["vlmscope"] == vlmscope.__version__
    assert record["versions"]["transformers"] == transformers.__version__
    assert record["versions"]["torch"] == torch.__version__
    assert record["model"] == "tiny-llava" and record["device"] == "cpu" and record["dtype"] == "float32"
    assert record["decoding"] == decoding and record["wall_seconds"] > 0 and record["created"].endswith("Z")


def test_explain_flow_and_heads_save_load_and_dispatch_by_kind(tiny_llava: VLM, tmp_path) -> None:
    maps = explain(tiny_llava, make_image(), PROMPT, layers="1,2", max_new_tokens=3)
    flows = flow(tiny_llava, make_image(), PROMPT, answer=ANSWER, cam="described")
    ranking = rank_heads(tiny_llava, [make_image(1), make_image(2)], PROMPT, top_k=2)
    for result, cls, decoding in ((maps, ExplainResult, "greedy"), (flows, FlowResult, None),
                                  (ranking, HeadRanking, None)):
        out = tmp_path / cls.kind
        written = result.save(out)
        run = json.loads((out / "run.json").read_text())
        assert written["run"] == str(out / "run.json")
        assert run["kind"] == cls.kind and run["provenance"] == result.provenance
        check_provenance(run["provenance"], decoding)
        loaded = load(out)
        assert type(loaded) is cls
        assert json.loads(json.dumps(loaded.to_json())) == {k: v for k, v in run.items() if k != "output"}
        assert cls.load(out).to_json() == loaded.to_json()
    # Saving twice into the same folder is a re-run: allowed for the same kind, refused for another kind.
    maps.save(tmp_path / "explain")
    with pytest.raises(InputError, match="holds a flow result, not explain"):
        maps.save(tmp_path / "flow")
    np.testing.assert_array_equal(load(tmp_path / "explain").maps, maps.maps)
    loaded_flow = load(tmp_path / "flow")
    assert loaded_flow.grids == flows.grids
    np.testing.assert_allclose(loaded_flow.cam_maps(), flows.cam_maps())
    assert load(tmp_path / "heads").heads() == ranking.heads()
    assert load(tmp_path / "explain", image=make_image()).plot().axes  # the image comes back for plotting
    with pytest.raises(InputError, match="a heads result takes no image"):
        load(tmp_path / "heads", image=make_image())


def test_smoothgrad_seed_is_in_the_provenance(tiny_llava: VLM) -> None:
    result = flow(tiny_llava, make_image(), PROMPT, answer=ANSWER, smooth_samples=1, seed=7)
    assert result.provenance["seed"] == 7
    generated = flow(tiny_llava, make_image(), PROMPT, max_new_tokens=2, cam=None)
    assert generated.provenance["decoding"] == "greedy" and generated.provenance["seed"] is None


def test_eval_run_folders_read_as_a_view(tmp_path) -> None:
    run = tmp_path / "chair-run"
    run.mkdir()
    settings = {"model": "tiny-llava", "decoding": "beam:num_beams=2", "max_new_tokens": 8}
    provenance = {"model": "tiny-llava", "versions": {"vlmscope": "0.1.0"}}
    (run / "run.json").write_text(json.dumps({"kind": "eval-chair", "settings": settings,
                                              "provenance": provenance}))
    (run / "captions.jsonl").write_text('{"image_id": 1, "caption": "a cat"}\n')
    view = vlmscope.load_result(run)
    assert isinstance(view, EvalRun) and view.kind == "eval-chair" and view.metrics is None
    assert view.settings == settings and view.provenance == provenance
    metrics = {"metrics": {"CHAIR_S": 50.0, "CHAIR_I": 25.0}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    view = load(run)
    assert view.metrics == metrics and view.to_json()["settings"] == settings
    assert "scored" in repr(view) and len(repr(view)) < 160
    with pytest.raises(AttributeError):
        view.kind = "eval-pope"  # read-only


@pytest.mark.parametrize("content, message", [
    (None, "has no run.json"),
    ("{not json", "is not valid JSON"),
    ('{"text": "old"}', 'has no "kind"'),
    ('{"kind": "nosuch"}', "unknown result kind 'nosuch'"),
])
def test_bad_result_folders_are_one_line_errors(tmp_path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "run.json").write_text(content)
    with pytest.raises(InputError, match=message) as info:
        load(tmp_path)
    assert "\n" not in str(info.value)


def test_loading_the_wrong_kind_is_refused(tmp_path) -> None:
    (tmp_path / "run.json").write_text('{"kind": "heads"}')
    with pytest.raises(InputError, match="holds a 'heads' result, not 'explain'"):
        ExplainResult.load(tmp_path)
    with pytest.raises(InputError, match="not an evaluation run"):
        EvalRun.load(tmp_path)


@pytest.mark.parametrize("command", ["explain", "flow", "heads"])
def test_cli_out_naming_a_file_fails_before_any_work(tmp_path, capsys, command: str) -> None:
    image = tmp_path / "img.png"
    make_image().save(image)
    target = tmp_path / "taken"
    target.write_text("keep me")
    inputs = ["--images", str(image)] if command == "heads" else ["--image", str(image)]
    # A model that does not exist: the output check must come first, or this would fail on the model.
    code = cli_main([command, "--model", "no-such-model", *inputs, "--prompt", PROMPT, "--out", str(target)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {target} is a file"), err
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "taken"]


# --- the Python API -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, names", [
    ("explain", {"image", "prompt", "steps", "layers", "heads", "reduce", "reduce_op", "scale", "max_new_tokens"}),
    ("flow", {"image", "prompt", "answer", "max_new_tokens", "layers", "chunk_size", "cam", "cam_threshold",
              "smooth_samples", "smooth_sigma", "seed"}),
    ("heads", {"images", "prompt", "top_k", "min_layer"}),
])
def test_vlm_methods_have_real_signatures_and_docstrings(method: str, names: set[str]) -> None:
    function = getattr(VLM, method)
    parameters = inspect.signature(function).parameters
    assert set(parameters) - {"self"} == names
    assert all(p.kind is not p.VAR_KEYWORD for p in parameters.values())
    assert len(inspect.getdoc(function)) > 200


def test_explain_and_flow_take_lists_like_generate(tiny_llava: VLM) -> None:
    images = [make_image(0), make_image(1)]
    both = tiny_llava.explain(images, PROMPT, layers=1, max_new_tokens=3)
    assert isinstance(both, list) and len(both) == 2
    for image, result in zip(images, both):
        alone = tiny_llava.explain(image, PROMPT, layers=1, max_new_tokens=3)
        assert isinstance(alone, ExplainResult) and result.token_ids == alone.token_ids
        np.testing.assert_array_equal(result.maps, alone.maps)
    flows = tiny_llava.flow(images, [PROMPT, "is there a dog ?"], answer=[ANSWER, "no"], cam=None)
    assert [f.answer for f in flows] == [ANSWER, "no"] and flows[1].prompt == "is there a dog ?"
    single = tiny_llava.flow(images[1], "is there a dog ?", answer="no", cam=None)
    assert single.saliency == flows[1].saliency
    with pytest.raises(InputError, match="2 images for 3 prompts"):
        tiny_llava.explain(images, [PROMPT] * 3)
    with pytest.raises(InputError, match="1 answers for 2 inputs"):
        tiny_llava.flow(images, PROMPT, answer=[ANSWER])


def test_heads_method_equals_rank_heads(tiny_llava: VLM) -> None:
    images = [make_image(3), make_image(4)]
    ranking = tiny_llava.heads(images, PROMPT, top_k=2)
    assert isinstance(ranking, HeadRanking)
    assert ranking.ranking == rank_heads(tiny_llava, images, PROMPT, top_k=2).ranking


def test_result_reprs_are_short(tiny_llava: VLM) -> None:
    results = [tiny_llava.generate(make_image(), PROMPT, max_new_tokens=4),
               tiny_llava.explain(make_image(), PROMPT, max_new_tokens=4),
               tiny_llava.flow(make_image(), PROMPT, answer=ANSWER, cam=None),
               tiny_llava.heads([make_image()], PROMPT, top_k=2)]
    for result in results:
        text = repr(result)
        assert text.startswith(type(result).__name__ + "(") and len(text) < 200 and "\n" not in text, text


def test_dir_shows_only_public_names() -> None:
    assert dir(vlmscope) == sorted(vlmscope.__all__)
    assert {"load", "load_result", "VLM", "InputError"} <= set(dir(vlmscope))
    assert not {"annotations", "TYPE_CHECKING", "Any", "errors"} & set(dir(vlmscope))
    assert vlmscope.VLM is VLM
