"""Before/after comparison: same inputs, rows keyed by original nodes, groups merged, reports."""

import json

import onnx
import pytest

from model_builders import small_mlp
from opstudio.core.measure.compare import compare_models, match_nodes
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.plan import report
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe, Step
from profile_builders import node_stats, profile_of


def stats(name, ms, group=(), op="MatMul"):
    return node_stats(name, ms, op, group)


def test_match_merges_groups_that_differ_between_the_two_runs():
    before = profile_of(stats("mm0", 2.0), stats("add0", 0.5, op="Add"), stats("mm1", 1.0))
    # after: onnxruntime fused mm0 with add0, mm1 unchanged
    after = profile_of(stats("mm0", 1.0, group=["mm0", "add0"]), stats("mm1", 1.0))
    rows = {r.name: r for r in match_nodes(before, after)}
    assert set(rows) == {"mm0", "mm1"}
    assert rows["mm0"].before_ms == pytest.approx(2.5)  # mm0 + add0, never compared alone
    assert rows["mm0"].after_ms == pytest.approx(1.0)
    assert sorted(rows["mm0"].group) == ["add0", "mm0"]
    assert rows["mm1"].speedup == pytest.approx(1.0)


def test_nodes_only_on_one_side_are_kept():
    before = profile_of(stats("mm0", 2.0))
    after = profile_of(stats("mm0", 1.0), stats("Cast_3", 0.1, op="Cast"))
    rows = {r.name: r for r in match_nodes(before, after)}
    # without the models, a node only one profile has is taken as added (no before time)
    assert rows["Cast_3"].before_ms is None and rows["Cast_3"].after_ms == pytest.approx(0.1)
    assert rows["Cast_3"].status == "added" and rows["Cast_3"].speedup is None


@pytest.fixture(scope="module")
def comparison():
    model = small_mlp()
    result = optimize(model, Recipe([Step("lowrank", {"rank": 8}, nodes=["fc1"]),
                                     Step("int8-dynamic", {"per_channel": False}, nodes=["fc2"])]))
    settings = ProfileSettings(runs=3, warmup=1, threads=1, dims={"batch": 8})
    return compare_models(model, result.model, settings), result


def test_compare_reports_original_nodes_accuracy_and_size(comparison):
    c, _ = comparison
    names = {r.name for r in c.nodes}
    assert {"fc1", "fc2"} <= names  # optimized kernels reported against their origin
    assert not any("lowrank" in n or n.endswith("_quant") for n in names)
    fc1 = c.node("fc1")
    assert fc1.before_ms > 0 and fc1.after_ms > 0
    [out] = c.accuracy.outputs
    assert out.name == "y" and 0.5 < out.cosine < 1.0  # rank 8 of 64 loses information
    assert c.size_bytes["after"] < c.size_bytes["before"]
    data = c.to_json()
    for key in ("before", "after", "speedup", "nodes", "accuracy", "size_bytes"):
        assert key in data
    assert set(data["nodes"][0]) >= {"name", "op_type", "before_ms", "after_ms", "speedup"}
    json.dumps(data)  # JSON-safe throughout


def test_reports_are_written_atomically_and_readable(comparison, tmp_path):
    c, result = comparison
    html = report.write_html(c, tmp_path / "r.html", result.steps)
    text = html.read_text()
    assert "<svg" in text and "fc1" in text and "Accuracy" in text and "lowrank" in text
    assert "<script" not in text  # self-contained, nothing executable
    csv_text = report.write_csv(c, tmp_path / "r.csv").read_text().splitlines()
    assert csv_text[0].startswith("name,op_type,before_ms,after_ms,speedup")
    assert len(csv_text) == len(c.nodes) + 1
    data = json.loads(report.write_json(c, tmp_path / "r.json", result.steps).read_text())
    assert data["steps"][0]["technique"] == "lowrank"
    assert not list(tmp_path.glob("*.tmp"))


def test_same_inputs_feed_both_models(tmp_path):
    """An input-dependent model still compares as identical to itself."""
    model = small_mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    c = compare_models(path, path, ProfileSettings(runs=2, warmup=0, threads=1,
                                                   dims={"batch": 4}, measure_plain=False))
    [out] = c.accuracy.outputs
    assert out.max_abs_err == 0.0 and out.cosine == pytest.approx(1.0)
