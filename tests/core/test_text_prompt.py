"""A language model judged on real text: the built-in passage tokenized with the model's own
tokenizer (found beside the model or named), fed as a prompt in every phase."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from llm_builders import kv_decoder, word_tokenizer
from model_builders import small_mlp
from opstudio.core.errors import OpstudioError
from opstudio.core.measure.accuracy import SYNTHETIC
from opstudio.core.measure.compare import compare_models
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.measure.text_prompt import (
    BUILTIN_NAME,
    builtin_text,
    find_tokenizer,
    judging,
    prompt_file,
    text_prompt,
    tokenize,
    with_text_prompt,
)
from opstudio.core.model.model_io import save_model
from opstudio.core.model.phases import describe_step, is_prompt
from opstudio.core.plan.optimize_compare import optimize_and_compare
from opstudio.core.plan.recipe import Recipe, Step

ROOT = Path(__file__).resolve().parents[2]
FAST = {"runs": 2, "warmup": 0, "threads": 1}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Prompt files go to the user's cache: here a temporary one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(params=["gqa", "hf"])
def decoder(request, tmp_path):
    """A decoder with its tokenizer.json beside it, as genai and optimum folders have."""
    folder = tmp_path / request.param
    folder.mkdir()
    path = folder / "model.onnx"
    save_model(kv_decoder(request.param), path)
    word_tokenizer(folder / "tokenizer.json", vocab=64)
    return path


def test_the_builtin_passage_is_prose_of_several_kinds():
    text = builtin_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 4
    assert 200 <= len(text.split()) <= 450  # a few hundred tokens with any tokenizer
    provenance = (ROOT / "resources" / "README.md").read_text()
    assert "prompt_passage.txt" in provenance and "written for opstudio" in provenance


def test_the_passage_ships_in_the_wheel_and_the_frozen_app():
    line = re.search(r"^opstudio = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert line is not None  # [tool.setuptools.package-data]
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    assert any(fnmatch.fnmatch("_resources/prompt_passage.txt", p) for p in patterns)
    assert (ROOT / "app" / "opstudio" / "_resources" / "prompt_passage.txt").is_file()
    assert "prompt_passage.txt" in (ROOT / "packaging" / "opstudio.spec").read_text()


def test_the_tokenizer_is_found_beside_the_model_or_the_folder_above(tmp_path):
    onnx_dir = tmp_path / "repo" / "onnx"
    onnx_dir.mkdir(parents=True)
    assert find_tokenizer(onnx_dir / "model.onnx") is None
    word_tokenizer(tmp_path / "repo" / "tokenizer.json")
    assert find_tokenizer(onnx_dir / "model.onnx") == tmp_path / "repo" / "tokenizer.json"
    word_tokenizer(onnx_dir / "tokenizer.json")
    assert find_tokenizer(onnx_dir / "model.onnx") == onnx_dir / "tokenizer.json"
    assert find_tokenizer(None) is None


def test_the_prompt_feeds_every_input_as_a_saved_prompt_would(decoder):
    model = kv_decoder(decoder.parent.name)
    prompt = text_prompt(model, decoder)
    assert prompt is not None and prompt.text_name == BUILTIN_NAME
    ids = tokenize(builtin_text(), decoder.parent / "tokenizer.json")
    feed = prompt.feed
    assert prompt.tokens == ids.shape[1] > 200
    np.testing.assert_array_equal(feed["input_ids"], ids)
    assert set(feed) == {i.name for i in model.graph.input}
    np.testing.assert_array_equal(feed["attention_mask"], np.ones_like(ids))
    if "position_ids" in feed:
        np.testing.assert_array_equal(feed["position_ids"][0], np.arange(ids.shape[1]))
    pasts = [v for k, v in feed.items() if k.startswith("past_key_values")]
    assert pasts and all(v.shape[-2] == 0 for v in pasts)
    assert is_prompt(model, feed)
    assert describe_step(model, feed) == f"prefill of {prompt.tokens} tokens"
    logits = ort.InferenceSession(str(decoder)).run(["logits"], feed)[0]
    assert logits.shape[:2] == (1, prompt.tokens)


def test_the_saved_prompt_decodes_after_the_text(decoder):
    """Written to a file, the prompt is a --inputs prompt: a decode step runs after it."""
    model = kv_decoder(decoder.parent.name)
    prompt = text_prompt(model, decoder)
    assert prompt is not None
    path = prompt_file(prompt.feed)
    assert prompt_file(prompt.feed) == path  # one file per prompt
    assert path.parent == decoder.parents[1] / "cache" / "opstudio" / "prompts"
    feeds = make_inputs(model, npz_path=path, phase="decode", model_path=decoder)
    assert feeds["input_ids"].shape == (1, 1)
    assert describe_step(model, feeds) == f"decode step after {prompt.tokens} tokens"


def test_another_text_and_a_named_tokenizer(tmp_path, decoder):
    model = kv_decoder(decoder.parent.name)
    text = tmp_path / "mine.txt"
    text.write_text("the water of the sea and the light of the sun")
    named = tmp_path / "tok"
    named.mkdir()
    word_tokenizer(named / "tokenizer.json", vocab=64)
    prompt = text_prompt(model, tmp_path / "elsewhere" / "model.onnx", tokenizer=named,
                         text=text)
    assert prompt is not None and prompt.describe() == "mine.txt (11 tokens)"
    with pytest.raises(OpstudioError, match="no such file"):
        text_prompt(model, decoder, text=tmp_path / "missing.txt")
    with pytest.raises(OpstudioError, match="no such file"):
        text_prompt(model, decoder, tokenizer=tmp_path / "missing.json")


def test_a_tokenizer_of_another_model_is_refused(tmp_path, decoder):
    word_tokenizer(decoder.parent / "tokenizer.json", vocab=500)
    with pytest.raises(OpstudioError, match="not this model's tokenizer"):
        text_prompt(kv_decoder(decoder.parent.name), decoder)


def test_judging_names_what_the_accuracy_is_judged_on(tmp_path, decoder):
    model = kv_decoder(decoder.parent.name)
    judged = judging(model, decoder, ProfileSettings())
    assert judged.feed is not None and judged.judged_on.startswith(BUILTIN_NAME)
    given = judging(model, decoder, ProfileSettings(inputs_path=str(tmp_path / "p.npz")))
    assert given.feed is None and given.judged_on == "p.npz"
    lonely = tmp_path / "alone.onnx"
    save_model(model, lonely)
    assert judging(model, lonely, ProfileSettings()).judged_on == SYNTHETIC
    with pytest.raises(OpstudioError, match="--tokenizer"):
        judging(model, lonely, ProfileSettings(prompt_text=str(tmp_path / "t.txt")))
    assert judging(small_mlp(), None, ProfileSettings()).judged_on == ""  # reads no tokens
    settings, judged_on = with_text_prompt(ProfileSettings(), decoder)
    assert judged_on == judged.judged_on and settings.inputs_path is not None
    assert is_prompt(model, dict(np.load(settings.inputs_path)))


def test_a_comparison_is_judged_on_the_text_and_timed_on_its_own_inputs(decoder):
    from opstudio.core.plan.report import render_html

    settings = ProfileSettings(**FAST, request=True, request_prompt=8, request_generate=4)
    c = compare_models(decoder, decoder, settings)
    assert c.accuracy.judged_on.startswith(BUILTIN_NAME) and not c.accuracy.synthetic
    assert "judged on the built-in text" in c.accuracy.summary()
    assert c.accuracy.outputs[0].shape[1] > 200  # the text's positions
    assert c.step == "prefill of 128 tokens"  # the timing is as the settings say
    assert c.to_json()["accuracy"]["judged_on"] == c.accuracy.judged_on
    html = render_html(c)
    assert html.count("judged on the built-in text (") == 2  # the card and the table's note
    assert "median per run, profiled; prefill of 128 tokens" in html
    assert "Time to first token" in html and "Tokens per second" in html
    assert "a prompt of 8 tokens, 4 generated" in html


def test_optimize_and_compare_calibrates_and_judges_on_the_text(decoder):
    from opstudio.core.model.model_io import load_model

    model = load_model(decoder)
    recipe = Recipe([Step("fp16", {}, nodes=["/lm_head/MatMul"])])
    _, c = optimize_and_compare(model, recipe, ProfileSettings(**FAST), model_path=decoder)
    assert c.accuracy.judged_on.startswith(BUILTIN_NAME)
    _, blind = optimize_and_compare(model, recipe, ProfileSettings(**FAST))
    assert blind.accuracy.synthetic
    assert "on synthetic tokens: not a measure of quality" in blind.accuracy.summary()
    from opstudio.core.plan.report import render_html

    assert "; on synthetic tokens: not a measure of quality" in render_html(blind)


def test_a_profile_names_the_step_it_ran(decoder):
    from opstudio.core.measure.profiler import Profile, profile_model
    from opstudio.core.session.document import profile_summary

    p = profile_model(decoder, ProfileSettings(**FAST, phase="decode", past=32))
    assert p.step == "decode step after 32 tokens"
    assert Profile.from_json(p.to_json()).step == p.step
    assert profile_summary(p).startswith("Profiled (decode step after 32 tokens): ")
    plain = profile_model(small_mlp_path(decoder.parent), ProfileSettings(**FAST))
    assert plain.step == "" and "step" not in plain.to_json()


def small_mlp_path(folder: Path) -> Path:
    path = folder / "mlp.onnx"
    save_model(small_mlp(), path)
    return path
