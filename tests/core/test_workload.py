"""A feed spec is resolved once per model: each kind of feed and the KV layout are made on first
use and kept, also across a whole ``opstudio compare``."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx

from llm_builders import kv_decoder, runtime_folder
from opstudio.cli import main
from opstudio.core.measure import inputs as inputs_module
from opstudio.core.measure.settings import FeedSpec, ProfileSettings, RunSettings
from opstudio.core.measure.workload import Workload
from opstudio.core.model import phases


def calls_of(monkeypatch, module, name):
    """Every call of ``module.name`` from any opstudio module (also those that imported the
    name itself), as (args, kwargs)."""
    original = getattr(module, name)
    seen = []

    def counted(*args, **kwargs):
        seen.append((args, kwargs))
        return original(*args, **kwargs)

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("opstudio") \
                and getattr(mod, name, None) is original:
            monkeypatch.setattr(mod, name, counted)
    return seen


def test_each_kind_of_feed_and_the_layout_are_made_once(monkeypatch, tmp_path):
    path = runtime_folder(tmp_path / "m", "gqa")
    made = calls_of(monkeypatch, inputs_module, "make_inputs")
    layouts = calls_of(monkeypatch, phases, "kv_layout")
    w = Workload.of(path, FeedSpec(phase="decode", past=5))
    assert w.main() is w.main() and w.decode(7) is w.decode(7) and w.prefill(4) is w.prefill(4)
    assert w.judging() is w.judging()
    assert w.step() == "decode step after 5 tokens" and w.kv_bytes() is not None
    assert [(k["phase"], k["past"]) for _, k in made] == [("decode", 5), ("decode", 7),
                                                          ("prefill", None)]
    assert len(layouts) == 1
    assert w.prefill(4)["input_ids"].shape == (1, 4)
    assert w.judging().feed is not None  # the tokenizer beside the model


def test_a_request_keeps_the_shapes_its_lengths_do_not_set():
    model = kv_decoder("gqa")
    w = Workload(model, FeedSpec(shapes={"input_ids": [1, 9], "attention_mask": [1, 9]}))
    assert w.main()["input_ids"].shape == (1, 9)
    assert w.prefill(4)["input_ids"].shape == (1, 4) and w.decode(4)["attention_mask"].shape == (1, 5)


def test_tensors_given_are_the_main_feed():
    model = kv_decoder("gqa")
    feeds = {"input_ids": np.zeros((1, 3), np.int64)}
    assert Workload(model, feeds=feeds).main() == feeds


def test_the_settings_are_the_two_halves():
    settings = ProfileSettings(runs=7, dims={"batch": 2}, phase="decode", seed=4)
    run = RunSettings.from_json(settings.to_json())
    assert run == RunSettings(runs=7) and isinstance(settings, RunSettings | FeedSpec)
    assert ProfileSettings.of(run, FeedSpec(dims={"batch": 2}, phase="decode", seed=4)) == settings
    assert ProfileSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings


def test_one_compare_of_a_kv_decoder_resolves_its_inputs_once(monkeypatch, tmp_path, capsys):
    # the head size is only in genai_config.json beside the model: it must be read
    before = runtime_folder(tmp_path / "m", "gqa")
    onnx.save(kv_decoder("gqa", head_dim_name="head_size"), before)
    after = tmp_path / "after.onnx"
    shutil.copy(before, after)
    made = calls_of(monkeypatch, inputs_module, "make_inputs")
    layouts = calls_of(monkeypatch, phases, "kv_layout")
    code = main(["compare", str(before), str(after), "--phase", "decode", "--past", "6",
                 "--request", "--prompt", "4", "--generate", "2", "--runs", "2",
                 "--warmup", "0", "--threads", "1", "--json", "-"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    # each feed made once, from the first model: the request's prefill and steps at pasts 4
    # and 4 + 2, the latter being the step compared (--past 6)
    kinds = sorted((k["phase"], k["past"] or 0) for _, k in made)
    assert kinds == [("decode", 4), ("decode", 6), ("prefill", 0)]
    assert all(k["model_path"] == str(before) for _, k in made)
    # one KV layout per model: the first's workload, the second's check that it has a cache
    assert len(layouts) == 2 and layouts[0][0][0] is not layouts[1][0][0]
    fed = {t["name"]: t["shape"] for t in data["before"]["inputs"]}
    assert fed["past_key_values.0.key"] == [1, 2, 6, 16]
    assert data["request"] is not None and data["accuracy"]["judged_on"] != ""
