"""The memory line of profile and compare: weights, a session's anonymous memory, KV cache."""

import json
import time

import numpy as np
import onnx
from onnx import numpy_helper

from llm_builders import kv_decoder
from model_builders import small_mlp
from opstudio.cli import main
from opstudio.core.measure import rounds
from opstudio.core.measure.memory import Memory
from opstudio.core.measure.profiler import ProfileSettings, profile_model, profile_models

LAYERS, KV_HEADS, HEAD = 2, 2, 16  # kv_decoder's defaults: hidden 64 over 4 heads


def _weights(model):
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def test_profile_of_a_decoder_gives_weights_session_and_kv_cache_bytes(tmp_path):
    model = kv_decoder("gqa", layers=LAYERS, kv_heads=KV_HEADS)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    settings = ProfileSettings(runs=3, warmup=1, threads=1, phase="decode", past=5)
    memory = profile_model(str(path), settings).memory
    assert memory is not None
    assert memory.weights_bytes == _weights(model) and not memory.weights_mapped
    # keys and values of every layer, float32, batch 1
    assert memory.kv_token_bytes == LAYERS * 2 * KV_HEADS * HEAD * 4
    assert memory.past == 5 and memory.kv_past_bytes == 5 * memory.kv_token_bytes
    assert memory.session_bytes is not None and memory.session_bytes >= 0
    assert memory.peak_bytes is not None and memory.peak_bytes > 0
    assert memory.sessions == 2  # one profiled, one plain
    line = memory.line()
    assert line.startswith("memory: weights ") and "(in the model)" in line
    assert "KV cache 512 B/token, 2.5 KiB at past 5" in line


def test_weights_in_an_external_file_are_said_to_be_mapped(tmp_path):
    model = small_mlp()
    weights = _weights(model)  # saving moves the model's tensors out to the file
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    memory = profile_model(str(path), ProfileSettings(runs=2, warmup=1, threads=1,
                                                      dims={"batch": 2})).memory
    assert memory is not None and memory.weights_mapped
    assert memory.weights_bytes == weights and memory.kv_token_bytes is None
    assert "(mapped from file)" in memory.line() and "KV cache" not in memory.line()
    assert Memory.from_json(json.loads(json.dumps(memory.to_json()))) == memory


def test_a_big_model_shares_one_session_between_profiled_and_plain_runs(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(rounds, "SHARED_SESSION_BYTES", 0)
    model = small_mlp()
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(model, a)
    onnx.save(model, b)
    before, after = profile_models([str(a), str(b)], ProfileSettings(
        runs=4, warmup=1, threads=1, dims={"batch": 2}))
    for p in (before, after):
        assert p.memory is not None and p.memory.sessions == 1
        assert p.plain_ms and len(p.plain_series_ms) == 4 and len(p.total_series_ms) == 4
        assert p.profiled_sessions == []  # its one session's trace
        assert any("one session per model" in n for n in p.notes)


def test_compare_prints_the_memory_line_in_text_json_and_html(tmp_path, capsys):
    model = kv_decoder("gqa", layers=LAYERS, kv_heads=KV_HEADS)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    html = tmp_path / "r.html"
    flags = ["--runs", "3", "--warmup", "1", "--threads", "1", "--phase", "decode",
             "--past", "4"]
    assert main(["compare", str(path), str(path), *flags, "--html", str(html)]) == 0
    printed = capsys.readouterr().out
    assert "before memory: weights " in printed and "after memory: weights " in printed
    assert "KV cache 512 B/token, 2.0 KiB at past 4" in printed
    assert "anonymous with all 2 models" in printed  # one process measured both
    page = html.read_text()
    assert "<h2>Memory</h2>" in page and "KV cache 512 B/token" in page
    assert main(["compare", str(path), str(path), *flags, "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    for side in ("before", "after"):
        memory = data[side]["memory"]
        assert memory["weights_bytes"] == _weights(model)
        assert memory["kv_bytes_per_token"] == 512 and memory["kv_bytes_at_past"] == 2048
        assert memory["process_peak_anon_bytes"] > 0


def test_profile_prints_the_memory_line(tmp_path, capsys):
    model = small_mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["profile", str(path), "--runs", "2", "--warmup", "1", "--threads", "1",
                 "--dim", "batch=2"]) == 0
    weights = _weights(model)
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("memory:"))
    assert "session " in line and "anonymous" in line
    assert np.isclose(float(line.split("weights ")[1].split()[0]),
                      weights / 2**10 if weights >= 2**10 else weights, atol=0.05)


def test_anon_peak_sees_memory_freed_before_the_block_ends():
    import mmap

    from opstudio.core.measure.memory import AnonPeak, anon_bytes

    with AnonPeak(interval=0.005) as watch:
        # fresh private anonymous pages, touched (an allocator could hand back pages the
        # process holds; a shared mapping counts as RssShmem)
        block = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        block.write(b"\x01" * len(block))
        during = anon_bytes()
        time.sleep(0.1)
        block.close()
    # what was held while the block lived (other tests' frees make a start figure unreliable)
    assert during is not None and watch.peak is not None
    assert watch.peak >= during - 4 * 2**20
    assert anon_bytes() < watch.peak - 32 * 2**20  # gone again, still counted
