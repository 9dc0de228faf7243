"""``opstudio inspect`` on decoders with a KV cache: the inputs line folds the cache, FLOPs
are shown for a decode step when no dims are given, and sums with unknown members read "–"."""

from __future__ import annotations

import json
import re

import pytest

from llm_builders import kv_decoder
from opstudio.cli import main
from opstudio.cli.common import human_count
from opstudio.core.measure.inputs import make_inputs
from opstudio.core.measure.roofline import dims_from_inputs
from opstudio.core.model.graph import analyze
from opstudio.core.model.model_io import save_model

NOTE = "dims not given: shown for a decode step at past 512; --dim NAME=N to choose"


def inspect(capsys, *argv: str) -> str:
    assert main(["inspect", *argv]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decoders")
    paths = {}
    for style in ("hf", "gqa"):
        paths[style] = folder / f"{style}30.onnx"
        save_model(kv_decoder(style, layers=30), paths[style])
    paths["small"] = folder / "hf4.onnx"  # for what does not need 30 layers
    save_model(kv_decoder("hf", layers=4), paths["small"])
    return paths


@pytest.mark.parametrize("style", ["hf", "gqa"])
def test_the_inputs_line_of_a_30_layer_decoder_is_short(decoders, capsys, style):
    out = inspect(capsys, str(decoders[style]))
    [line] = [x for x in out.splitlines() if x.startswith("inputs: ")]
    heads = 4 if style == "hf" else 2
    assert f"past_key_values.{{0..29}}.{{key,value}}: float32 " \
           f"[batch_size,{heads},past_sequence_length,16]" in line
    assert line.startswith("inputs: input_ids: int64 [batch_size,sequence_length], "
                           "attention_mask: int64 [batch_size,total_sequence_length]")
    assert len(line) < 400, len(line)
    # with dims given, the line shows them, folded the same way
    out = inspect(capsys, str(decoders[style]), "--dim", "batch_size=2",
                  "--dim", "past_sequence_length=7")
    assert f"past_key_values.{{0..29}}.{{key,value}}: float32 [2,{heads},7,16]" in out


def test_without_dims_a_kv_decoder_is_shown_for_a_decode_step(decoders, capsys):
    path = str(decoders["small"])
    out = inspect(capsys, path)
    assert NOTE in out.splitlines()
    assert "FLOPs need dims" not in out and "FLOPs unknown" not in out
    # the FLOPs are those of the decode step a run with --phase decode feeds
    model = kv_decoder("hf", layers=4)
    dims = dims_from_inputs(model, make_inputs(model, phase="decode"))
    assert dims["past_sequence_length"] == 512 and dims["sequence_length"] == 1
    info = analyze(model, dims)
    assert info.flops_unknown() == 0
    total = re.search(r"operators, (.+?)FLOPs,", out).group(1)
    assert total.strip() == human_count(info.total_flops())
    # the table's shapes are the decode step's: one new token, 513 keys
    assert "[1,4,513,16]" in out and "[1,1,64]" in out
    data = json.loads(inspect(capsys, path, "--json", "-"))
    assert data["dims"] == dims and data["dims_assumed"] == "a decode step at past 512"
    assert data["totals"]["flops"] == info.total_flops()


def test_given_dims_are_used_as_they_are(decoders, capsys):
    out = inspect(capsys, str(decoders["small"]), "--dim", "batch_size=1")
    assert "dims not given" not in out
    assert "FLOPs need dims: pass --dim sequence_length=N --dim total_sequence_length=N " \
           "--dim past_sequence_length=N" in out
    data = json.loads(inspect(capsys, str(decoders["small"]), "--json", "-", "--dim",
                              "batch_size=1"))
    assert data["dims"] == {"batch_size": 1} and data["dims_assumed"] is None


def test_a_decoder_whose_dims_cannot_be_derived_asks_for_them(tmp_path, capsys):
    # a symbolic head size and no attention node to read it from
    path = tmp_path / "opaque.onnx"
    save_model(kv_decoder("hf", layers=2, head_dim_name="head_dim"), path)
    out = inspect(capsys, str(path))
    assert "dims not given" not in out
    assert "FLOPs unknown" in out and "--dim head_dim=N" in out


def by_layer_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.split("layer / module", 1)[1].splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) > 2:
            rows.setdefault(parts[0], parts[1:])
    return rows


def test_per_layer_flops_are_a_dash_while_dims_are_missing(decoders, capsys):
    # batch given, the lengths not: every layer holds Casts (0 FLOPs) and MatMuls (unknown)
    out = inspect(capsys, str(decoders["small"]), "--dim", "batch_size=1", "--by-layer")
    rows = by_layer_rows(out)
    for key in ("layer 0", "layer 3", "attention (all 4 layers)", "embedding (no layer)",
                "total"):
        _, flops, weights, moved = rows[key]
        assert (flops, moved) == ("–", "–"), (key, rows[key])
        assert weights.endswith("B")  # weights are known whatever the dims
    assert not any(r[1] == "0" for k, r in rows.items() if k.startswith("layer"))
    # per op type too: MatMuls all unknown, Subs partly (a shape's arithmetic is known)
    assert re.search(r"^MatMul\s+\d+\s+–\s+\d+ unknown$", out, re.MULTILINE)
    assert re.search(r"^Cast\s+\d+\s+0$", out, re.MULTILINE)


def test_per_layer_flops_add_up_at_the_decode_step(decoders, capsys):
    out = inspect(capsys, str(decoders["small"]), "--by-layer")
    rows = by_layer_rows(out)
    total = re.search(r"operators, (.+?)FLOPs,", out).group(1).strip()
    assert rows["total"][1] == total
    assert rows["layer 0"][1] == rows["layer 3"][1] != "–"
