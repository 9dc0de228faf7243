"""``inspect --by-layer`` and ``profile --by-layer``: totals per layer and module."""

from __future__ import annotations

import re

import pytest

from layer_models import PER_LAYER, layered_decoder
from opstudio.cli import main
from opstudio.core.model.graph import analyze
from opstudio.core.model.model_io import save_model

FAST = ["--runs", "3", "--warmup", "1", "--threads", "1"]


@pytest.fixture
def decoder_path(tmp_path):
    path = tmp_path / "decoder.onnx"
    save_model(layered_decoder(layers=3), path)
    return path


def rows(text):
    """First column → the other columns, for the table lines of the output."""
    out = {}
    for line in text.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) > 2:
            out.setdefault(parts[0], parts[1:])
    return out


def test_inspect_by_layer(decoder_path, capsys):
    assert main(["inspect", str(decoder_path), "--dim", "batch=1", "--dim", "seq=4",
                 "--by-layer"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    graph = analyze(layered_decoder(layers=3), {"batch": 1, "seq": 4})
    mlp_flops = sum(n.flops for n in graph.nodes if n.name.startswith("/model/layers.1/mlp/"))
    assert table["layer 1"][0] == str(PER_LAYER)
    assert table["MLP"][0] == "4"  # gate, up, Mul, down
    assert table["MLP"][1] == f"{mlp_flops / 1e3:.2f} k"
    assert table["MLP (all 3 layers)"][0] == "12"
    assert table["lm_head (no layer)"][0] == "1"
    assert table["total"][0] == str(len(graph.nodes))
    # weights add up to the model's, each tensor once
    assert table["total"][2] == re.search(r"FLOPs, (.+?) of weights", out).group(1)


def test_profile_by_layer(decoder_path, capsys):
    assert main(["profile", str(decoder_path), *FAST, "--dim", "batch=1", "--dim", "seq=8",
                 "--by-layer", "--top", "0"]) == 0
    out = capsys.readouterr().out
    table = rows(out.split("layer / module", 1)[1])
    ms = {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^(/model/layers\.1/\S+)\s+\S+\s+([\d.]+)", out, re.MULTILINE)}
    assert ms, out
    assert float(table["layer 1"][1]) == pytest.approx(sum(ms.values()), abs=2e-4)
    shares = [float(table[f"{m} (all 3 layers)"][2].rstrip("%")) for m in
              ("norms", "attention", "MLP", "other")]
    assert all(s >= 0 for s in shares) and sum(shares) <= 100.5


def test_by_layer_without_layers_says_so(tmp_path, capsys):
    model = layered_decoder(layers=2)
    for i, node in enumerate(model.graph.node):
        node.name = f"node_{i}"  # names without scopes
    path = tmp_path / "flat.onnx"
    save_model(model, path)
    assert main(["inspect", str(path), "--by-layer"]) == 0
    assert "no node name carries a layer index" in capsys.readouterr().out
