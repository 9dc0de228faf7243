"""Intervals that hold what two sessions of one model differ by: each model is timed and
profiled on several sessions, every session of one meeting every session of the other, and the
interval of the paired ratio, the whole model's and every operator's, is over sessions
(``timing.session_interval``)."""

from __future__ import annotations

import numpy as np
import onnx
from test_measurement_noise import chain, forked_children  # noqa: F401 (a fixture)

from opstudio.core.measure import profiler
from opstudio.core.measure.compare import compare_models, match_nodes, operators_changed
from opstudio.core.measure.profiler import PLAIN_SESSIONS, ProfileSettings
from opstudio.core.measure.rounds import Rotation, rotated_sessions
from opstudio.core.measure.timing import FASTER, paired_ratio
from opstudio.core.measure.trace import rotated_runs
from profile_builders import node_stats, profile_of


def timed_on_sessions(rng, n, k, session_sd, run_sd, speedup=1.0):
    """Paired run times of A and B = A made ``speedup``× faster, each model on ``k`` sessions
    whose steady offsets are drawn with ``session_sd`` (log scale), rotated as the profiler
    does; a tenth of the runs hit by another process."""
    rot_a, rot_b = Rotation([None] * k, 0), Rotation([None] * k, 1)
    sa, sb = [], []
    for i in range(n):
        rot_a.turn(i)
        rot_b.turn(i)
        sa.append(rot_a.current)
        sb.append(rot_b.current)
    off_a, off_b = rng.normal(0, session_sd, k), rng.normal(0, session_sd, k)
    hit = lambda: np.where(rng.random(n) < 0.1, rng.uniform(1.2, 2.5, n), 1.0)  # noqa: E731
    a = np.exp(off_a[sa] + rng.normal(0, run_sd, n)) * hit()
    b = np.exp(off_b[sb] + rng.normal(0, run_sd, n)) / speedup * hit()
    return a, b, (sa, sb)


def test_rotation_meets_every_pair_of_sessions_in_k_squared_rounds():
    k = 4
    a, b = Rotation([None] * k, 0), Rotation([None] * k, 1)
    pairs = set()
    for i in range(k * k):
        a.turn(i)
        b.turn(i)
        pairs.add((a.current, b.current))
    assert pairs == {(j, m) for j in range(k) for m in range(k)}


def test_identical_models_on_sessions_that_differ_hold_1_in_95_percent():
    rng = np.random.default_rng(21)
    held_sessions = held_one_pair = 0
    trials = 400
    for _ in range(trials):
        a, b, on = timed_on_sessions(rng, 20, PLAIN_SESSIONS, session_sd=0.04, run_sd=0.03)
        r = paired_ratio(a, b, on)
        held_sessions += r.low <= 1.0 <= r.high
        assert r.sessions == PLAIN_SESSIONS
        # one session each, as before: the offset of that one pair is taken for the models'
        a1, b1, _ = timed_on_sessions(rng, 20, 1, session_sd=0.04, run_sd=0.03)
        r1 = paired_ratio(a1, b1)
        held_one_pair += r1.low <= 1.0 <= r1.high
    assert held_sessions / trials >= 0.93
    assert held_one_pair / trials < 0.6  # what the fix is for


def test_a_real_speedup_is_still_found_over_sessions():
    rng = np.random.default_rng(5)
    found = sum(paired_ratio(*timed_on_sessions(rng, 20, PLAIN_SESSIONS, 0.04, 0.03,
                                                speedup=1.5)).verdict == FASTER
                for _ in range(100))
    assert found >= 90  # the price of the wider interval: 94 here, 100 at 2×


def test_compare_times_and_profiles_each_model_on_several_sessions(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "copy.onnx"
    onnx.save(chain(big=True), a)
    onnx.save(chain(big=True), b)
    c = compare_models(a, b, ProfileSettings(runs=16, warmup=1, threads=1))
    every_pair = {(j, m) for j in range(PLAIN_SESSIONS) for m in range(PLAIN_SESSIONS)}
    sa, sb = c.before.plain_sessions, c.after.plain_sessions
    assert len(sa) == len(sb) == len(c.before.plain_series_ms) == 16
    assert set(zip(sa, sb)) == every_pair
    assert c.plain_ratio.sessions == PLAIN_SESSIONS
    from opstudio.core.measure.compare import interval_text

    assert interval_text(c.plain_ratio).endswith("paired runs on 4 sessions of each model")
    # the profiled runs too, the same 16 rounds spread over four traces a model
    pa, pb = c.before.profiled_sessions, c.after.profiled_sessions
    assert len(pa) == len(pb) == len(c.before.total_series_ms) == 16
    assert set(zip(pa, pb)) == every_pair
    assert all(len(n.series_ms) == 16 for p in (c.before, c.after) for n in p.nodes)
    timed = [r for r in c.nodes if r.ratio is not None]
    assert {r.name for r in timed} >= {"mm_big", "mm_out"}
    assert all(r.ratio.sessions == PLAIN_SESSIONS for r in timed)
    assert operators_changed(timed).endswith(" (profiled on 4 sessions of each model)")
    assert c.total_ratio.sessions == PLAIN_SESSIONS
    # the memory line counts every session open: four profiled and four plain a model
    assert c.before.memory.sessions == c.after.memory.sessions == 2 * PLAIN_SESSIONS
    assert "(×8 open)" in c.before.memory.line()


def test_profiled_sessions_are_as_many_as_fit_beside_the_plain_ones():
    assert rotated_sessions(PLAIN_SESSIONS, 100) == (PLAIN_SESSIONS, PLAIN_SESSIONS)
    assert rotated_sessions(PLAIN_SESSIONS, 5) == (4, 2)
    assert rotated_sessions(PLAIN_SESSIONS, 4) == (4, 1)  # the verdict's runs first
    assert rotated_sessions(PLAIN_SESSIONS, 0) == (1, 1)
    assert rotated_sessions(PLAIN_SESSIONS, 3, plain=False) == (0, 4)
    assert rotated_sessions(1, 100) == (1, 1)  # one model: nothing to pair sessions with


def test_one_profiled_session_per_model_when_no_more_fit(tmp_path, forked_children,  # noqa: F811
                                                         monkeypatch):
    monkeypatch.setattr(profiler, "sessions_that_fit", lambda sizes: 1)
    a, b = tmp_path / "a.onnx", tmp_path / "copy.onnx"
    onnx.save(chain(big=False), a)
    onnx.save(chain(big=False), b)
    before, after = profiler.profile_models([a, b], ProfileSettings(runs=6, warmup=1,
                                                                    threads=1))
    for p in (before, after):
        assert p.profiled_sessions == [] and len(p.total_series_ms) == 6
        assert p.memory is not None and p.memory.sessions == 2  # one profiled, one plain
        assert all(len(n.series_ms) == 6 for n in p.nodes)
        assert any(n.startswith("one profiled session per model") for n in p.notes)
    rows = [r for r in match_nodes(before, after) if r.ratio is not None]
    assert rows and all(r.ratio.sessions == 1 for r in rows)
    assert "(profiled on one session of each model: what two sessions" in operators_changed(rows)


def _runs(session, durations, start=0):
    """A trace of runs of one operator taking ``durations`` µs, as one session writes it."""
    events = []
    for k, d in enumerate(durations):
        ts = start + 1000 * k
        events += [{"cat": "Session", "name": "model_run", "ts": ts, "dur": d + 10},
                   {"cat": "Node", "name": "mm_kernel_time", "ts": ts + 1, "dur": d,
                    "args": {"op_name": "MatMul", "session": session}}]
    return events


def test_the_traces_of_several_sessions_are_put_back_in_the_order_their_runs_ran():
    # session 0 warmed up twice, session 1 once; then rounds ran on 0, 1, 1, 0, 1
    used = [0, 1, 1, 0, 1]
    traces = [_runs(0, [900, 901, 100, 103]), _runs(1, [800, 101, 102, 104], start=50)]
    runs, notes = rotated_runs(traces, used, ran=[4, 4])
    assert [kernels[0]["dur"] for _, kernels in runs] == [100, 101, 102, 103, 104]
    assert notes == []
    # a trace that stopped recording ends the runs at the first it lacks, and says so
    capped = [traces[0], _runs(1, [800, 101])]
    runs, notes = rotated_runs(capped, used, ran=[4, 4])
    assert [kernels[0]["dur"] for _, kernels in runs] == [100, 101]
    assert len(notes) == 1 and "2 of the 5 timed runs" in notes[0]


def test_an_operators_interval_holds_what_its_profiled_sessions_differ_by():
    """Identical models whose sessions each run an operator steadily a few percent apart (where
    their memory landed): profiled on one session each, such a row reads "different" as often
    as not; on four, paired over them, it rarely does."""
    rng = np.random.default_rng(3)
    called = {1: 0, PLAIN_SESSIONS: 0}
    trials = 60
    for _ in range(trials):
        for k in called:
            a, b, (sa, sb) = timed_on_sessions(rng, 40, k, session_sd=0.04, run_sd=0.01)
            before = profile_of(node_stats("mm", 1.0))
            after = profile_of(node_stats("mm", 1.0))
            before.nodes[0].series_ms, after.nodes[0].series_ms = list(a), list(b)
            before.total_series_ms, after.total_series_ms = list(a), list(b)
            if k > 1:
                before.profiled_sessions, after.profiled_sessions = list(sa), list(sb)
            [row] = match_nodes(before, after)
            assert row.ratio.sessions == k
            called[k] += row.significant
    assert called[PLAIN_SESSIONS] <= trials // 10
    assert called[1] >= trials // 3
