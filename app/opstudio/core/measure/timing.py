"""Is model A faster than model B? Paired, interleaved timing that a busy machine cannot fool.

Two models timed one after the other see different machines (another process wakes up, the
CPU clocks down). Timed in alternation, run i of A and run i of B are moments apart, so the
ratio of the two is nearly free of that drift; the median of those ratios, with its 95 %
interval, says whether A is faster, slower or equally fast within what was measured.

The interval of a median is the distribution-free one: the order statistics a Binomial(n, ½)
leaves 2.5 % outside on each side. A bootstrap percentile interval of a median is too narrow
at the sizes timed here (it covers ~88 % at 20 pairs: measured, 7.5 % of identical pairs came
out "different" where 5 % should).

Sessions run without spinning worker threads: a session whose threads spin after its run
steals the cores from the next session's run (measured here: the same graph timed 1.7× apart
depending on its neighbour).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from opstudio.core.model.runtime import create_session, session_options

# pairs a verdict needs: n pairs on one side of 1 by chance is 2 in 2**n
# Two sessions of the very same model, timed in turns, still differ steadily by a few percent
# on a busy machine (where their memory lands, which one's threads wake first): measured here,
# an identical copy read 1.06× [1.02, 1.12] over 8 rounds. A verdict needs its interval to
# clear that band, not just 1.
SAME_WITHIN = 0.03
MIN_ROUNDS = 6


# What a paired before/after ratio says, the one decision every view shows (words, colour,
# JSON ``verdict``): beyond the noise faster or slower, the same within it, or too few pairs
# to tell (then never "≈ 1×": 5 pairs cannot show that nothing changed).
FASTER, SLOWER, SAME, UNDECIDED = "faster", "slower", "same", "undecided"


@dataclass(frozen=True)
class Ratio:
    """Median of time(A) / time(B) over paired runs, with its 95 % interval. Read as a
    speedup (before / after): above 1 is faster."""

    median: float
    low: float
    high: float
    rounds: int
    # sessions of each model the rounds were spread over (their differences are in the interval)
    sessions: int = 1

    @property
    def faster(self) -> bool:
        """A is faster than B beyond the noise of this measurement."""
        return self.high < 1.0

    @property
    def verdict(self) -> str:
        """``FASTER``/``SLOWER`` when the interval clears 1 by more than ``SAME_WITHIN`` (beyond
        the noise of this measurement and beyond what two sessions of one model differ by),
        ``SAME`` when it does not, ``UNDECIDED`` below ``MIN_ROUNDS`` pairs (3 pairs all above
        1 happen by chance 1 in 4)."""
        if self.rounds < MIN_ROUNDS:
            return UNDECIDED
        if self.low > 1.0 + SAME_WITHIN:
            return FASTER
        if self.high < 1.0 / (1.0 + SAME_WITHIN):
            return SLOWER
        return SAME

    @property
    def significant(self) -> bool:
        """A verdict of faster or slower."""
        return self.verdict in (FASTER, SLOWER)

    def describe(self) -> str:
        return f"{self.median:.3f}× [{self.low:.3f}, {self.high:.3f}] over {self.rounds} rounds"

    def too_few(self) -> str:
        """"too few runs to tell (5 pairs; 6 needed)"."""
        return f"too few runs to tell ({self.rounds} pairs; {MIN_ROUNDS} needed)"

    def label(self, digits: int = 2) -> str:
        """How a ratio is shown in a cell: the median beyond the noise, "≈ 1×" within it,
        "too few runs" when the pairs cannot tell."""
        v = self.verdict
        if v == UNDECIDED:
            return "too few runs"
        return f"{self.median:.{digits}f}×" if v != SAME else "≈ 1×"

    def words(self, digits: int = 2) -> str:
        """The verdict in a sentence, a slowdown as plainly as a speedup: "1.85× faster",
        "1.15× slower", "≈ 1× (no change beyond the noise)", "too few runs to tell (…)"."""
        v = self.verdict
        if v == FASTER:
            return f"{self.median:.{digits}f}× faster"
        if v == SLOWER:
            return f"{1 / self.median:.{digits}f}× slower"
        if v == SAME:
            return "≈ 1× (no change beyond the noise)"
        return self.too_few()


@dataclass(frozen=True)
class Spread:
    """Run times of one model on a machine that may have been busy.

    Another process waking up only ever slows a run down, so disturbed runs are the slow
    outliers: more than ``_MAD_LIMIT`` robust deviations (1.4826·MAD) above the median. The
    figures a user sees come from the quiet runs.
    """

    runs: int
    disturbed: int
    median_ms: float
    mad_ms: float
    cv: float  # coefficient of variation of the quiet runs
    quiet_ms: tuple[float, ...]

    @property
    def busy(self) -> bool:
        return self.disturbed > max(1, self.runs // 20)

    def describe(self) -> str:
        if not self.busy:
            return f"steady: {self.runs} runs, spread {self.cv:.1%}"
        return (f"the machine was busy: {self.disturbed} of {self.runs} runs disturbed; "
                "figures from the quiet runs")


_MAD_LIMIT = 3.5

# A profile whose stretches of runs disagree by this much (%) says its figures are uncertain:
# on 2 cores with three busy processes, two profiles of one model read the heavy operators
# 27-28 % apart (with one busy process, 2-8 %).
UNCERTAIN_PCT = 5.0
_STRETCHES = 4


def drift_pct(series: Sequence[float]) -> float | None:
    """How far (in % of the median of all runs) the medians of ``_STRETCHES`` consecutive
    stretches of runs stray from it, the farthest: what a profile taken a little earlier or
    later could have read, from the profile's own runs. A machine that stays equally busy
    moves every stretch alike; one whose load comes and goes moves them apart. None below
    two stretches of 3 runs."""
    x = np.asarray(series, dtype=float)
    k = min(_STRETCHES, x.size // 3)
    med = float(np.median(x)) if x.size else 0.0
    if k < 2 or med <= 0:
        return None
    return 100.0 * max(abs(float(np.median(part)) - med) for part in np.array_split(x, k)) / med


def spread(times_ms: Sequence[float]) -> Spread:
    t = np.asarray(times_ms, dtype=float)
    if t.size == 0:
        return Spread(0, 0, float("nan"), float("nan"), float("nan"), ())
    median = float(np.median(t))
    mad = float(np.median(np.abs(t - median)))
    # a perfectly steady sample has MAD 0: allow 1 % before calling a run disturbed
    limit = median + max(_MAD_LIMIT * 1.4826 * mad, 0.01 * median)
    quiet = t[t <= limit]
    cv = float(np.std(quiet) / np.mean(quiet)) if quiet.size > 1 and np.mean(quiet) > 0 else 0.0
    return Spread(int(t.size), int(t.size - quiet.size), float(np.median(quiet)), mad, cv,
                  tuple(float(x) for x in quiet))


def _median_ci(x: np.ndarray) -> tuple[float, float]:
    """95 % interval of the median of ``x``: [x_(j), x_(n+1-j)], the largest j with
    P(Binomial(n, ½) < j) ≤ 2.5 % (below 6 samples none: the whole range, and no verdict)."""
    x = np.sort(x)
    n = x.size
    if n > 300:  # normal approximation of the binomial
        j = math.floor(n / 2 - 1.96 * math.sqrt(n) / 2)
    else:
        j, tail = 0, 0.0
        while j < n and tail + math.comb(n, j) / 2**n <= 0.025:
            tail += math.comb(n, j) / 2**n
            j += 1
    lo, hi = max(j - 1, 0), min(n - j, n - 1)
    return float(x[lo]), float(x[hi])


def median_interval(times_ms: Sequence[float]) -> tuple[float, float]:
    """95 % interval of the median of ``times_ms``."""
    t = np.asarray(times_ms, dtype=float)
    if t.size == 0:
        return float("nan"), float("nan")
    return _median_ci(t)


def paired_ratio(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                 sessions: tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]
                 | None = None) -> Ratio:
    """Median of a/b over paired runs with its 95 % interval. With ``sessions`` (which session
    of A and of B ran in each pair), the interval also holds what the sessions differ by
    (``session_interval``)."""
    r = np.asarray(a, dtype=float) / np.asarray(b, dtype=float)
    lo, hi = _median_ci(r)
    k = 1
    if sessions is not None:
        sa, sb = (np.asarray(s, dtype=int) for s in sessions)
        k = max(len(set(sa.tolist())), len(set(sb.tolist())))
        between = session_interval(np.log(r), sa, sb)
        if between is not None:
            lo, hi = min(lo, float(np.exp(between[0]))), max(hi, float(np.exp(between[1])))
    return Ratio(float(np.median(r)), lo, hi, int(r.size), sessions=k)


# Student's t, 97.5 % quantile, by degrees of freedom (interpolated in 1/df: within 1 % from
# 2 df on, wider than the true one below)
_T975 = ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (6, 2.447), (7, 2.365),
         (8, 2.306), (10, 2.228), (12, 2.179), (15, 2.131), (20, 2.086), (30, 2.042),
         (60, 2.000), (math.inf, 1.960))


def t975(df: float) -> float:
    """Student's t quantile leaving 2.5 % above, for ``df`` (≥ 1, fractional allowed)."""
    df = max(1.0, df)
    for (d0, t0), (d1, t1) in itertools.pairwise(_T975):
        if df <= d1:
            x0, x1, x = 1 / d0, 1 / d1, 1 / df
            return t0 + (t1 - t0) * (x0 - x) / (x0 - x1)
    return 1.96


def session_interval(log_r: np.ndarray, sa: np.ndarray, sb: np.ndarray
                     ) -> tuple[float, float] | None:
    """95 % interval of log(A/B) when A ran on several sessions and B on several, each pair
    of runs on one session of each (``sa[i]``, ``sb[i]``), every session of A meeting every
    session of B about equally often.

    Two sessions of one model differ steadily by a few percent (where their memory lands), a
    difference no number of runs on the same two sessions averages out. Each session's effect
    is a draw, so the interval is over sessions: the median of the pairs each session of A
    took part in (B's sessions balance out in it) spreads by A's session effects and the runs'
    own noise, likewise for B; the median of all pairs varies by the sum of those spreads over
    the sessions' count (erring wide: the runs' noise is counted on both sides), with
    Satterthwaite's degrees of freedom for the t quantile. Medians, not means: on a busy
    machine one run in ten is hit, and a mean of few runs follows it. None when either side
    ran on one session only."""
    ka, kb = sorted(set(sa.tolist())), sorted(set(sb.tolist()))
    if len(ka) < 2 or len(kb) < 2:
        return None
    rows = np.array([np.median(log_r[sa == j]) for j in ka])
    cols = np.array([np.median(log_r[sb == k]) for k in kb])
    centre = float(np.median(log_r))
    v_rows, v_cols = rows.var(ddof=1) / rows.size, cols.var(ddof=1) / cols.size
    var = v_rows + v_cols
    if var <= 0:
        return centre, centre
    df = var**2 / (v_rows**2 / (rows.size - 1) + v_cols**2 / (cols.size - 1))
    half = t975(df) * math.sqrt(var)
    return centre - half, centre + half


def session(model: Any, threads: int = 0) -> Any:
    """An onnxruntime CPU session for a path or ModelProto, set up for fair alternation."""
    return create_session(model, session_options(threads=threads, spinning=False))


def interleaved_times(sessions: Mapping[str, Any], feeds: Mapping[str, Any], *,
                      rounds: int = 40, warmup: int = 3, min_rounds: int = 10,
                      time_budget_s: float | None = None) -> dict[str, np.ndarray]:
    """Milliseconds per run of each session, the sessions taking turns round by round (in
    alternating order).

    With ``time_budget_s`` the rounds stop once the budget is spent (never below
    ``min_rounds``)."""
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, dict(feeds))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    start = time.perf_counter()
    order = list(sessions.items())
    for i in range(rounds):
        # alternate who goes first: the second run of a round may inherit the first's caches
        for k, s in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            s.run(None, dict(feeds))
            times[k].append((time.perf_counter() - t0) * 1e3)
        if (time_budget_s is not None and i + 1 >= min_rounds
                and time.perf_counter() - start > time_budget_s):
            break
    return {k: np.asarray(v) for k, v in times.items()}


# onnxruntime's trace counts whole µs: a kernel read as 0 µs took less than one
_TRACE_RESOLUTION_MS = 0.0005


def quiet_runs(values: Sequence[float]) -> list[int]:
    """Indices of the runs ``timing.spread`` does not call disturbed."""
    if not values:
        return []
    limit = max(spread(values).quiet_ms)
    return [i for i, v in enumerate(values) if v <= limit]


def paired_speedup(before_ms: Sequence[float], after_ms: Sequence[float],
                   rounds: Sequence[int] | None = None,
                   sessions: tuple[Sequence[int], Sequence[int]] | None = None
                   ) -> Ratio | None:
    """before/after of runs timed in turns (run i with run i), over ``rounds`` (default all),
    or None when either side did not run. Times under the trace's resolution count as half
    of it. ``sessions``: the session each run of before and of after ran on, when each model
    ran on several (``paired_ratio``)."""
    n = min(len(before_ms), len(after_ms))
    keep = [i for i in (range(n) if rounds is None else rounds) if i < n]
    b = np.asarray(before_ms, dtype=float)[keep]
    a = np.asarray(after_ms, dtype=float)[keep]
    if b.size == 0 or not b.any() or not a.any():
        return None
    on = None
    if sessions is not None and min(len(sessions[0]), len(sessions[1])) >= n:
        on = (np.asarray(sessions[0], dtype=int)[keep], np.asarray(sessions[1], dtype=int)[keep])
    return paired_ratio(np.maximum(b, _TRACE_RESOLUTION_MS), np.maximum(a, _TRACE_RESOLUTION_MS),
                        on)


def quiet_rounds(before_ms: Sequence[float], after_ms: Sequence[float]) -> list[int]:
    """Rounds in which neither model's run was disturbed, when the machine was busy
    (``timing.spread``): another process waking up slows one run of a pair, and that pair says
    nothing about the models. A steady side keeps all its runs (a median shrugs off one)."""
    n = min(len(before_ms), len(after_ms))
    keep = set(range(n))
    for series in (list(before_ms[:n]), list(after_ms[:n])):
        if series and spread(series).busy:
            keep &= set(quiet_runs(series))
    return sorted(keep) or list(range(n))
