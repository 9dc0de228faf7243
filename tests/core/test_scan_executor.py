"""Where scan jobs run, without Ray itself: what ``--cluster`` accepts, what it refuses, and
the message when Ray is not installed (the Ray runs are in test_scan_cluster.py)."""

from __future__ import annotations

import sys

import onnx
import pytest
from onnx import external_data_helper

from llm_builders import kv_decoder
from opstudio.cli import main
from opstudio.core.errors import OpstudioError
from opstudio.core.plan.scan_executor import cluster_address, model_files, open_cluster


def test_cluster_values():
    assert cluster_address(None) is None
    assert cluster_address("") is None
    assert cluster_address("local") is None
    assert cluster_address("auto") == "auto"
    assert cluster_address(" ray://head.example:10001 ") == "ray://head.example:10001"
    for bad in ("ray://head", "head:10001", "ray://:10001", "ray://head:port"):
        with pytest.raises(OpstudioError, match=r"auto .* or ray://HOST:PORT"):
            cluster_address(bad)


def test_the_local_pool_needs_no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert open_cluster(None, "no/such.onnx") is None
    assert open_cluster("local", "no/such.onnx") is None


def _advise(folder, budget: list[str]) -> int:
    path = folder / "m.onnx"
    onnx.save(kv_decoder("hf", layers=1, vocab=64, hidden=16), path)
    return main(["advise", str(path), *budget, "--cluster", "auto",
                 "-o", str(folder / "plan.json")])


def test_without_ray_a_cluster_is_refused_with_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert _advise(tmp_path, ["--budget-top1", "0.9"]) != 0
    assert "pip install 'opstudio[cluster]'" in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()


def test_a_cluster_is_for_the_next_token_scan_only(tmp_path, capsys):
    assert _advise(tmp_path, ["--budget-cosine", "0.999"]) != 0
    assert "--cluster applies with --budget-top1 or --budget-kl" in capsys.readouterr().err


def test_the_probe_checks_the_model_and_its_external_data(tmp_path):
    model = kv_decoder("hf", layers=1, vocab=64, hidden=16)
    external_data_helper.convert_model_to_external_data(model, location="m.onnx.data",
                                                        size_threshold=0)
    onnx.save(model, tmp_path / "m.onnx")
    assert model_files(str(tmp_path / "m.onnx")) == [str(tmp_path / "m.onnx"),
                                                     str(tmp_path / "m.onnx.data")]
