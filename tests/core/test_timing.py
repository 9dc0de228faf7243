"""Paired, interleaved timing: the ratio, its interval, and the timer the advisor uses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from model_builders import small_mlp
from opstudio.core.measure.timing import interleaved_times, paired_ratio, session
from opstudio.core.plan.recipe import Recipe, Step
from opstudio.core.plan.timer import measured_timer


def test_a_clear_difference_is_faster_and_noise_is_not():
    rng = np.random.default_rng(0)
    drift = rng.uniform(1.0, 3.0, 50)  # the machine's load, shared by both in each round
    fast = paired_ratio(drift * 0.8 * rng.uniform(0.99, 1.01, 50), drift)
    assert fast.median == pytest.approx(0.8, abs=0.01) and fast.faster
    same = paired_ratio(drift * rng.uniform(0.98, 1.02, 50), drift)
    assert same.low <= 1.0 <= same.high and not same.faster
    assert same.rounds == 50 and "over 50 rounds" in same.describe()


def test_interleaved_times_take_turns_and_respect_the_time_budget(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(small_mlp(), path)
    feeds = {"x": np.zeros((8, 64), np.float32)}
    sessions = {"a": session(str(path), threads=1), "b": session(onnx.load(path), threads=1)}
    times = interleaved_times(sessions, feeds, rounds=1000, min_rounds=12, time_budget_s=0.0)
    assert len(times["a"]) == len(times["b"]) == 12
    assert (times["a"] > 0).all()


def test_measured_timer_compares_two_recipes_of_the_real_model(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(small_mlp(), path)
    timer = measured_timer(str(path), {"x": np.zeros((8, 64), np.float32)}, threads=1,
                           time_budget_s=0.2)
    ratio = timer(Recipe([Step("fp16", {}, nodes=["fc1"])]), Recipe([]))
    assert ratio.rounds >= 15 and ratio.low <= ratio.median <= ratio.high


def test_verdict_on_synthetic_samples_equal_shifted_and_heavy_tailed():
    from opstudio.core.measure.timing import spread

    rng = np.random.default_rng(0)
    base = rng.normal(10.0, 0.3, 60)
    same = paired_ratio(base, rng.normal(10.0, 0.3, 60))
    assert not same.significant and same.label() == "≈ 1×"
    halved = paired_ratio(base, rng.normal(5.0, 0.15, 60))
    assert halved.significant and halved.label() == f"{halved.median:.2f}×"
    assert 1.9 < halved.median < 2.1
    # a busy machine: a third of the runs of both sides hit by another process
    tail_a = base * np.where(rng.random(60) < 0.3, rng.uniform(1.5, 4.0, 60), 1.0)
    tail_b = rng.normal(10.0, 0.3, 60) * np.where(rng.random(60) < 0.3,
                                                  rng.uniform(1.5, 4.0, 60), 1.0)
    assert not paired_ratio(tail_a, tail_b).significant
    busy = spread(tail_a)
    assert busy.busy and "of 60 runs disturbed" in busy.describe()
    assert abs(busy.median_ms - 10.0) < 0.3
    steady = spread(base)
    assert not steady.busy and steady.describe().startswith("steady")


def test_median_interval_holds_the_median():
    from opstudio.core.measure.timing import median_interval

    t = np.random.default_rng(1).normal(3.0, 0.1, 40)
    lo, hi = median_interval(t)
    assert lo <= float(np.median(t)) <= hi and hi - lo < 0.2


def test_one_verdict_of_three_states_a_slowdown_as_plain_as_a_speedup():
    from opstudio.core.measure.timing import FASTER, MIN_ROUNDS, SAME, SLOWER, UNDECIDED, Ratio

    faster = Ratio(1.85, 1.79, 1.92, rounds=20)
    assert faster.verdict == FASTER and faster.label() == "1.85×"
    assert faster.words() == "1.85× faster"
    slower = Ratio(0.87, 0.83, 0.92, rounds=20)
    assert slower.verdict == SLOWER and slower.label() == "0.87×"
    assert slower.words() == "1.15× slower"
    same = Ratio(0.99, 0.95, 1.04, rounds=20)
    assert same.verdict == SAME and same.label() == "≈ 1×" and not same.significant
    # the interval of 5 pairs says 8-17 % slower, but 5 pairs on one side of 1 happen by
    # chance 1 in 16: no verdict, and no "≈ 1×" either
    few = Ratio(0.87, 0.83, 0.92, rounds=MIN_ROUNDS - 1)
    assert few.verdict == UNDECIDED and not few.significant
    assert few.label() == "too few runs"
    assert few.words() == f"too few runs to tell ({MIN_ROUNDS - 1} pairs; {MIN_ROUNDS} needed)"
    assert Ratio(0.87, 0.83, 0.92, rounds=MIN_ROUNDS).verdict == SLOWER
