"""`opstudio compare`: exit codes, the JSON contract, HTML/CSV outputs."""

import json
import re

import onnx

from model_builders import small_mlp
from opstudio.cli import main
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe, Step


def test_compare_json_contract(tmp_path, capsys):
    model = small_mlp()
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(model, before)
    optimized = optimize(model, Recipe([Step("int8-dynamic", {}, op_types=["MatMul"])])).model
    onnx.save(optimized, after)
    code = main(["compare", str(before), str(after), "--runs", "3", "--warmup", "1",
                 "--threads", "1", "--dim", "batch=4", "--json", "-"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"before", "after", "speedup", "nodes", "accuracy", "size_bytes",
                         "speedup_ci", "significant", "plain_speedup_ci", "noise", "verdict"}
    assert data["verdict"] == "undecided"  # 3 pairs cannot tell
    lo, hi = data["speedup_ci"]
    assert lo <= data["plain_speedup"] <= hi and isinstance(data["significant"], bool)
    for node in data["nodes"]:
        assert {"speedup_ci", "significant", "verdict"} <= set(node)
        if node["speedup_ci"] is not None:
            assert node["speedup_ci"][0] <= node["speedup"] <= node["speedup_ci"][1]
            assert isinstance(node["significant"], bool) and node["verdict"] == "undecided"
    names = {n["name"] for n in data["nodes"]}
    assert {"fc1", "fc2"} <= names
    out = data["accuracy"]["outputs"][0]
    assert set(out) >= {"name", "max_abs_err", "mean_abs_err", "cosine", "snr_db"}
    assert data["size_bytes"]["after"] < data["size_bytes"]["before"]


def test_compare_writes_html_and_csv_and_prints_a_table(tmp_path, capsys):
    model = small_mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    html, csv = tmp_path / "r.html", tmp_path / "r.csv"
    code = main(["compare", str(path), str(path), "--runs", "5", "--warmup", "0",
                 "--threads", "1", "--dim", "batch=2", "--html", str(html), "--csv", str(csv)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "total (median, profiled)" in printed and "cosine" in printed
    # a model against itself, with 5 runs: no verdict can be drawn from so few, and "≈ 1×"
    # would claim one
    # (rounds a busy machine disturbed are left out of the pairs: 5 or fewer)
    assert re.search(r"verdict: too few runs to tell \([1-5] pairs; 6 needed\)", printed)
    assert re.search(r"operators: too few runs to tell \([1-5] pairs; 6 needed\)", printed)
    assert "hint:" not in printed  # no KV cache, nothing to hint at
    assert "95% interval" in printed and "≈ 1×" not in printed
    assert html.read_text().startswith("<!doctype html>")
    assert csv.read_text().startswith("name,op_type")


def test_compare_missing_file_is_one_line(tmp_path, capsys):
    code = main(["compare", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ")


def test_a_fused_decoder_is_summarised_by_its_kernels(tmp_path, capsys):
    from llm_builders import llama_decoder
    from opstudio.core.measure.compare import compare_models, map_nodes
    from opstudio.core.measure.profiler import ProfileSettings
    from opstudio.core.plan import report

    model = llama_decoder(layers=2)
    fused = optimize(model, Recipe([Step("fuse", {}, op_types=["Pow", "Softmax"])])).model
    before, after = tmp_path / "before.onnx", tmp_path / "fused.onnx"
    onnx.save(model, before)
    onnx.save(fused, after)
    # what the fused kernels stand for: their provenance, and the nodes only they read from
    mapping = map_nodes(model, fused)
    kernels = {u.name: u.op_type for u in mapping.units}
    attn = "/model/layers.0/self_attn"
    assert kernels[f"{attn}/GroupQueryAttention"] == "GroupQueryAttention"
    assert sorted(kernels.values()).count("SkipSimplifiedLayerNormalization") == 4
    assert "/model/mask/Where" in mapping.absorbed and "/model/rotary_emb/Cos" in mapping.absorbed
    assert mapping.removed == [] and mapping.added == []

    c = compare_models(before, after, ProfileSettings(runs=3, warmup=1, threads=1,
                                                      measure_plain=False))
    rows = {r.name: r for r in c.nodes}
    gqa = rows[f"{attn}/GroupQueryAttention"]
    assert gqa.op_type == "GroupQueryAttention" and gqa.status == "fused"
    assert f"{attn}/Softmax" in gqa.group and gqa.after_ms is not None
    assert c.node(f"{attn}/Softmax") is gqa
    # the fused model's own profile names the row after its kernel too
    (kernel,) = [s for s in c.after.nodes if s.name == f"{attn}/GroupQueryAttention"]
    assert kernel.op_type == "GroupQueryAttention" and f"{attn}/Softmax" in kernel.group
    assert not [r for r in c.nodes if r.status == "removed"]
    members = {m for u in mapping.units for m in u.members}
    assert c.changes()["fused"] == len(members | set(mapping.absorbed))
    # a layer's norms, attention, packed q|k|v MatMul and its weight's one Cast
    assert c.changes()["kernels"] == 11
    text = c.changes_text()
    assert text.startswith(f"{c.changes()['fused']} nodes fused into 11 kernels (")
    assert "GroupQueryAttention ×2" in text and "MatMul ×2" in text and "removed" not in text
    assert "GroupQueryAttention" in report.render_html(c) and text in report.render_html(c)

    assert main(["compare", str(before), str(after), "--runs", "3", "--warmup", "1",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"AFTER's nodes: {text}" in out
    line = next(ln for ln in out.splitlines() if ln.startswith(f"{attn}/GroupQueryAttention"))
    assert "GroupQueryAttention" in line.split()[1] and "fused" in line


def test_compare_says_each_side_shares_its_kv_buffer(tmp_path, capsys):
    import shutil

    from llm_builders import runtime_folder

    before = runtime_folder(tmp_path / "a", "gqa")
    shutil.copytree(before.parent, tmp_path / "b")
    code = main(["compare", str(before), str(tmp_path / "b" / "model.onnx"), "--runs", "3",
                 "--warmup", "1", "--phase", "decode", "--past", "8", "--kv-buffer", "shared"])
    assert code == 0
    out = capsys.readouterr().out
    for side in ("before", "after"):
        assert f"{side} KV cache: past and present share one buffer (4 bound)" in out
    assert "next-token agreement 1.00" in out
