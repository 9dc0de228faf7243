"""A profile on a machine so busy that its figures move says by how much ("figures uncertain to
±X %", X from stretches of its own runs), and --until-stable says it could not settle rather
than print figures that move."""

from __future__ import annotations

import time

import onnx
import pytest
from test_measurement_noise import chain, forked_children  # noqa: F401 (a fixture)

from opstudio.cli import main
from opstudio.core.measure import profiler
from opstudio.core.measure.profiler import ProfileSettings, build_profile, profile_model
from opstudio.core.measure.timing import drift_pct


def two_ops() -> onnx.ModelProto:
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) { h = Relu(x)
                                     y = Sigmoid(h) }""")
    m.graph.node[0].name, m.graph.node[1].name = "relu", "sig"
    return m


def trace_of(heavy_us):
    """A hand-made onnxruntime trace: per run, a heavy Relu of ``heavy_us[i]`` and a 10 µs
    Sigmoid."""
    trace = []
    for i, us in enumerate(heavy_us):
        trace += [{"cat": "Session", "name": "model_run", "ts": i * 10**5, "dur": us + 20},
                  {"cat": "Node", "name": "relu_kernel_time", "ts": i * 10**5 + 5, "dur": us,
                   "args": {"op_name": "Relu"}},
                  {"cat": "Node", "name": "sig_kernel_time", "ts": i * 10**5 + us + 8,
                   "dur": 10, "args": {"op_name": "Sigmoid"}}]
    return trace


def test_drift_is_how_far_stretches_of_runs_stray_from_the_whole():
    assert drift_pct([1.0] * 20) == 0.0
    # the load rose halfway: stretches read 1.0, 1.0, 1.3, 1.3 around a median of 1.15
    assert drift_pct([1.0] * 10 + [1.3] * 10) == pytest.approx(100 * 0.15 / 1.15)
    # load that comes and goes run by run, a run in four, moves every stretch alike
    assert drift_pct([1.0, 1.0, 1.0, 1.3] * 5) == pytest.approx(0.0)
    assert drift_pct([1.0] * 5) is None  # fewer than two stretches of 3


def test_a_profile_whose_operators_moved_says_its_figures_are_uncertain():
    moving = [1000 + (300 if i >= 10 else 0) + i % 3 for i in range(20)]
    p = build_profile(two_ops(), trace_of(moving), warmup=0, timed=20)
    assert p.noise["uncertain_pct"] == pytest.approx(13.0, abs=0.5)
    assert p.notes[0].startswith("figures uncertain to ±13 %: stretches of this profile's runs")
    assert p.to_json()["noise"]["uncertain_pct"] == p.noise["uncertain_pct"]
    # the app's status line after a profile says it first
    from opstudio.core.session.document import profile_summary

    assert "— figures uncertain to ±13 %" in profile_summary(p)
    steady = build_profile(two_ops(), trace_of([1000 + i % 3 for i in range(20)]), warmup=0,
                           timed=20)
    assert steady.noise["uncertain_pct"] < 1
    assert not any(n.startswith("figures uncertain") for n in steady.notes)


def drifting(monkeypatch):
    """Every run of the child takes longer than the one before, as on a machine getting busier
    and busier: nothing settles."""
    real_run = profiler.Fed.run
    calls = {"n": 0}

    def run(self, outputs, feeds):
        calls["n"] += 1
        time.sleep(0.002 * (1 + calls["n"] / 30))
        return real_run(self, outputs, feeds)

    monkeypatch.setattr(profiler.Fed, "run", run)


def test_until_stable_reports_that_it_could_not_settle(forked_children, monkeypatch):  # noqa: F811
    drifting(monkeypatch)
    p = profile_model(chain(big=False), ProfileSettings(runs=6, warmup=0, threads=1,
                                                        until_stable=5.0, time_budget_s=1.0))
    stable = p.noise["stable"]
    assert not stable["reached"] and stable["pct"] > 5.0
    assert p.notes[0].startswith(f"could not settle: figures uncertain to ±{stable['pct']:.0f} % "
                                 f"after {stable['rounds']} runs (target ±5 %)")


def test_cli_until_stable_prints_no_figures_that_would_not_settle(forked_children,  # noqa: F811
                                                                  monkeypatch, tmp_path, capsys):
    drifting(monkeypatch)
    path = tmp_path / "chain.onnx"
    onnx.save(chain(big=False), path)
    code = main(["profile", str(path), "--runs", "6", "--warmup", "0", "--threads", "1",
                 "--until-stable", "5", "--time-budget", "1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("error: could not settle: figures uncertain to ±")
    assert "median ms" not in out  # no table of figures that move
