"""The app's document and plan, without Qt: what each change announces, what it clears, undo
and redo of the plan, files written from the results, and the status lines."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

from model_builders import small_mlp
from opstudio.core.errors import OpstudioError
from opstudio.core.measure.accuracy import AccuracyReport
from opstudio.core.measure.compare import Comparison
from opstudio.core.measure.profiler import ProfileSettings, profile_model
from opstudio.core.measure.timing import Ratio
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe, Step
from opstudio.core.session.document import Document, comparison_summary, profile_summary
from opstudio.core.session.edits import Plan
from opstudio.core.session.opening import open_for_display


def test_plan_undo_redo_and_history_events():
    plan = Plan()
    changes, history = [], []
    plan.changed.connect(lambda: changes.append([s.technique for s in plan.steps]))
    plan.history_changed.connect(lambda: history.append((plan.can_undo(), plan.can_redo())))
    plan.add(Step("fp16", {}, nodes=["a"]))
    plan.add(Step("int8-dynamic", {}, nodes=["b"]))
    assert plan.undo_text() == "add int8-dynamic"
    plan.undo()
    assert [s.technique for s in plan.steps] == ["fp16"] and plan.can_redo()
    plan.redo()
    plan.remove(0)
    assert [s.technique for s in plan.steps] == ["int8-dynamic"]
    assert not plan.can_redo()  # a new edit drops what was undone
    plan.replace([], "clear")
    plan.undo()
    plan.undo()
    assert changes == [["fp16"], ["fp16", "int8-dynamic"], ["fp16"], ["fp16", "int8-dynamic"],
                       ["int8-dynamic"], [], ["int8-dynamic"], ["fp16", "int8-dynamic"]]
    assert history[-1] == (True, True)
    plan.clear_history()
    assert history[-1] == (False, False) and len(plan.steps) == 2
    plan.undo()  # nothing to undo: no change
    assert len(plan.steps) == 2 and len(changes) == 8
    assert plan.recipe().to_json() == Recipe(plan.steps).to_json()
    assert plan.techniques_by_node(None) == {"a": "fp16", "b": "int8-dynamic"}


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("doc") / "mlp.onnx"
    onnx.save(small_mlp(), path)
    return path


def test_document_announces_each_change_and_clears_what_no_longer_holds(mlp_path, tmp_path):
    settings = ProfileSettings(runs=3, warmup=1, threads=1, dims={"batch": 2})
    doc = Document(settings)
    seen: list[str] = []
    doc.opened.connect(lambda o: seen.append(f"opened {o.path.name}"))
    doc.profiled.connect(lambda p: seen.append("profiled"))
    doc.compared.connect(lambda c: seen.append("compared"))
    doc.plan.changed.connect(lambda: seen.append(f"plan {len(doc.plan.steps)}"))

    opened = open_for_display(mlp_path, {"batch": 2})
    doc.open(opened, [Step("int8-dynamic", {}, nodes=["fc1"])])
    assert doc.model_path == opened.path and doc.graph is opened.graph
    assert [s.nodes for s in doc.plan.steps] == [["fc1"]] and not doc.plan.can_undo()

    profile = profile_model(mlp_path, settings)
    doc.set_profile(profile)
    assert doc.profile is profile and doc.comparison is None
    assert [s.name for s in doc.slowest()] == sorted(
        (s.name for s in profile.nodes), key=lambda n: -profile.node(n).p50_ms)
    with pytest.raises(OpstudioError, match="Optimize & compare first"):
        doc.save_optimized(tmp_path / "out.onnx")

    optimized = optimize(opened.model, doc.plan.recipe())
    after = dataclasses.replace(profile)
    comparison = Comparison(before=profile, after=after, nodes=[], accuracy=AccuracyReport(),
                            size_bytes={})
    doc.set_comparison(optimized, comparison)
    assert doc.profile is profile and doc.comparison is comparison
    with pytest.raises(OpstudioError, match="original model"):
        doc.save_optimized(mlp_path, overwrite=True)
    saved = onnx.load(doc.save_optimized(tmp_path / "out.onnx"))
    assert "MatMulInteger" in {n.op_type for n in saved.graph.node}
    assert doc.export_report(tmp_path / "r.csv").read_text().startswith("name,op_type")

    # a new baseline hides the comparison made against the old one; re-opening clears all
    doc.set_profile(profile)
    assert doc.comparison is None and doc.optimized is not None
    doc.open(open_for_display(mlp_path, {"batch": 2}))
    assert doc.profile is None and doc.optimized is None and doc.plan.steps == []
    assert seen == ["opened mlp.onnx", "plan 1", "profiled", "compared", "profiled",
                    "opened mlp.onnx", "plan 0"]
    assert profile_summary(profile).startswith("Profiled: ")


def test_comparison_summary_says_about_1x_within_the_noise(mlp_path):
    profile = profile_model(mlp_path, ProfileSettings(runs=3, warmup=1, threads=1,
                                                       dims={"batch": 2}))

    def summary(plain: Ratio | None, total: Ratio | None) -> str:
        return comparison_summary(Comparison(profile, profile, [], AccuracyReport(), {},
                                             total_ratio=total, plain_ratio=plain))

    assert summary(None, None) == "Optimized"
    noisy = Ratio(1.04, 0.97, 1.10, rounds=30)
    text = summary(noisy, None)
    assert "≈ 1×" in text and "[0.97, 1.10]" in text and "without the profiler" in text
    text = summary(None, Ratio(1.85, 1.79, 1.92, rounds=30))
    assert "1.85× faster" in text and "[1.79, 1.92]" in text and "(profiled)" in text
    # a slowdown is said as plainly as a speedup
    text = summary(Ratio(0.87, 0.83, 0.92, rounds=30), None)
    assert text.startswith("Optimized: 1.15× slower (0.87×), 95 % interval [0.83, 0.92]")
    # 5 pairs cannot tell, whatever their interval: never "≈ 1×" nor "no change"
    text = summary(Ratio(0.87, 0.83, 0.92, rounds=5), None)
    assert text.startswith("Optimized: too few runs to tell (5 pairs; 6 needed)")
    assert "≈ 1×" not in text and "no change" not in text
