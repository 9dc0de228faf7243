"""Time per request of a decoder with a KV cache: the prefill of a prompt, then decode steps.

A user of an LLM waits for a request in two parts. The *time to first token* (TTFT) is the
prefill of the P prompt tokens (its last logits give the first new token). Each further token
is one decode step after a longer past: P, P+1, …, P+G−2 for G generated tokens, so a request of
P+G tokens takes TTFT + those G−1 steps. Attention reads the whole past, so a step costs more
the longer the past (roughly linearly); the step is timed at a few past lengths (P and P+G) and
the steps in between are interpolated linearly. Tokens per second is the decode rate: 1000 over
the mean step of the request, in ms.

Timing is what ``profile`` and ``compare`` do, without the profiler: one child process, one
plain session per model (a generation loop keeps one), and the prefill and each decode past a
kind of run taking turns round by round with the models swapped within each kind
(``profiler``'s rounds). Round i thus gives a whole request per model: its TTFT plus its
interpolated steps. Medians and their 95 % intervals come from those per-round series, with the
rounds ``timing.spread`` calls disturbed left out; two models are compared by the paired ratios
of the same rounds (``timing.paired_speedup``), "≈ 1×" when the interval holds 1.

Inputs are synthetic (``workload.Workload.prefill`` and ``decode``): the lengths are the
request's; other ``--dim`` values (a batch size) and the ``--shape`` of inputs no length sizes
apply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.settings import RunSettings
from opstudio.core.measure.timing import (
    Ratio,
    median_interval,
    paired_speedup,
    quiet_rounds,
    spread,
)
from opstudio.core.measure.workload import (
    PREFILL,
    Workload,
    decode_kind,
    no_kv_cache,
    workload_for,
)
from opstudio.core.model.phases import check_request

Progress = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

DEFAULT_PROMPT = 128
DEFAULT_GENERATE = 128


def decode_pasts(prompt: int, generate: int) -> tuple[int, ...]:
    """Past lengths the decode step is timed at: the request's first step and one past its
    last, so every step in between is interpolated, never extrapolated."""
    return (prompt, prompt + generate)


def has_kv_cache(model: onnx.ModelProto) -> bool:
    from opstudio.core.model.phases import kv_layout

    return bool(kv_layout(model).past)


def require_kv_cache(model: onnx.ModelProto, name: str = "the model") -> None:
    if not has_kv_cache(model):
        raise no_kv_cache(name)


# ---------------------------------------------------------------------------------------------
# Estimates (pure: tested on synthetic series)


def step_weights(pasts: Sequence[int], prompt: int, generate: int) -> np.ndarray:
    """Weights w such that Σ w·d(pasts) is the mean decode step of the request, d linear
    between the timed pasts: the request's steps are at pasts P … P+G−2; with G = 1 there is
    none, and the next token's step (past P) stands for the rate."""
    pasts = sorted(pasts)
    steps = np.arange(prompt, prompt + generate - 1, dtype=float)
    if steps.size == 0:
        steps = np.array([float(prompt)])
    eye = np.eye(len(pasts))
    return np.array([np.interp(steps, pasts, eye[k]).mean() for k in range(len(pasts))])


@dataclass
class RequestEstimate:
    """One model's request: medians with 95 % intervals over the timed rounds."""

    prompt: int
    generate: int
    ttft_ms: float
    ttft_ci: tuple[float, float]
    decode_ms: float  # mean decode step of the request
    decode_ci: tuple[float, float]
    total_ms: float
    total_ci: tuple[float, float]
    decode_at_ms: dict[int, float]  # median step at each timed past
    rounds: int
    disturbed: int  # rounds left out: the machine was busy
    model: str = ""
    # per timed round (not written to JSON): what pairs with another model's rounds
    ttft_series: list[float] = field(default_factory=list, repr=False)
    decode_series: list[float] = field(default_factory=list, repr=False)
    total_series: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms if self.decode_ms > 0 else float("inf")

    @property
    def tokens_per_s_ci(self) -> tuple[float, float]:
        lo, hi = self.decode_ci
        return (1000.0 / hi if hi > 0 else float("inf"), 1000.0 / lo if lo > 0 else float("inf"))

    def describe(self) -> str:
        """ "time to first token 812 ms [790, 840]; decode 24.1 ms/token [23.9, 24.4] →
        41.5 tokens/s [41.0, 41.8]; a request of 128+128 tokens: 3.9 s [3.8, 4.0]" """
        lo, hi = self.tokens_per_s_ci
        return (f"time to first token {with_interval(self.ttft_ms, self.ttft_ci)}; "
                f"decode {with_interval(self.decode_ms, self.decode_ci, '/token')} → "
                f"{rate(self.tokens_per_s)} tokens/s [{rate(lo)}, {rate(hi)}]; a request of "
                f"{self.prompt}+{self.generate} tokens: "
                f"{with_interval(self.total_ms, self.total_ci)}")

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": self.prompt, "generate": self.generate,
                "ttft_ms": _r(self.ttft_ms), "ttft_ci": _rs(self.ttft_ci),
                "decode_ms_per_token": _r(self.decode_ms), "decode_ci": _rs(self.decode_ci),
                "tokens_per_s": _r(self.tokens_per_s, 3),
                "tokens_per_s_ci": _rs(self.tokens_per_s_ci, 3),
                "total_ms": _r(self.total_ms), "total_ci": _rs(self.total_ci),
                "decode_at_ms": {str(p): _r(v) for p, v in self.decode_at_ms.items()},
                "rounds": self.rounds, "disturbed": self.disturbed}


def estimate(prefill_ms: Sequence[float], decode_ms: Mapping[int, Sequence[float]],
             prompt: int, generate: int, model: str = "") -> RequestEstimate:
    """The request of ``prompt`` + ``generate`` tokens from timed rounds: ``prefill_ms[i]`` and
    ``decode_ms[past][i]`` are round i's runs (decode timed at two or more pasts)."""
    check_request(prompt, generate)
    pasts = sorted(decode_ms)
    if not pasts:
        raise OpstudioError("a request estimate needs the decode step timed at a past length")
    n = min([len(prefill_ms), *(len(decode_ms[p]) for p in pasts)])
    if n == 0:
        raise OpstudioError("a request estimate needs at least one timed round")
    ttft = np.asarray(prefill_ms[:n], dtype=float)
    steps = np.array([np.asarray(decode_ms[p][:n], dtype=float) for p in pasts])
    per_token = step_weights(pasts, prompt, generate) @ steps
    total = ttft + (generate - 1) * per_token
    # a round with any of its runs disturbed leaves every figure: the rounds stay paired
    keep = _quiet([ttft, *steps])
    return RequestEstimate(
        prompt=prompt, generate=generate,
        ttft_ms=float(np.median(ttft[keep])), ttft_ci=median_interval(ttft[keep]),
        decode_ms=float(np.median(per_token[keep])), decode_ci=median_interval(per_token[keep]),
        total_ms=float(np.median(total[keep])), total_ci=median_interval(total[keep]),
        decode_at_ms={p: float(np.median(steps[k][keep])) for k, p in enumerate(pasts)},
        rounds=n, disturbed=int(n - keep.size), model=model,
        ttft_series=ttft.tolist(), decode_series=per_token.tolist(), total_series=total.tolist())


def _quiet(series: Sequence[np.ndarray]) -> np.ndarray:
    """Rounds in which no run was a slow outlier of its kind (``timing.spread``)."""
    keep = np.ones(len(series[0]), dtype=bool)
    for s in series:
        keep &= s <= max(spread(s.tolist()).quiet_ms)
    return np.flatnonzero(keep)


@dataclass
class RequestComparison:
    """Before and after, measured in the same rounds; ratios are before/after (speedups)."""

    before: RequestEstimate
    after: RequestEstimate
    ttft: Ratio | None
    decode: Ratio | None  # also the tokens/s ratio (after's rate over before's)
    total: Ratio | None

    def to_json(self) -> dict[str, Any]:
        def ratio(r: Ratio | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {"median": _r(r.median, 4), "ci": [_r(r.low, 4), _r(r.high, 4)],
                    "significant": r.significant, "verdict": r.verdict, "label": r.label()}

        return {"prompt": self.before.prompt, "generate": self.before.generate,
                # the models are the comparison's before and after (paths may be temporary)
                "before": {k: v for k, v in self.before.to_json().items() if k != "model"},
                "after": {k: v for k, v in self.after.to_json().items() if k != "model"},
                "speedup": {"ttft": ratio(self.ttft), "tokens_per_s": ratio(self.decode),
                            "total": ratio(self.total)}}


def compare_requests(before: RequestEstimate, after: RequestEstimate) -> RequestComparison:
    """Paired before/after ratios over the rounds neither side's request was disturbed in."""

    rounds = quiet_rounds(before.total_series, after.total_series)
    return RequestComparison(
        before, after,
        ttft=paired_speedup(before.ttft_series, after.ttft_series, rounds),
        decode=paired_speedup(before.decode_series, after.decode_series, rounds),
        total=paired_speedup(before.total_series, after.total_series, rounds))


def duration(ms: float) -> str:
    """812 ms, 24.1 ms, 3.9 s."""
    value, unit = _scaled(ms, ms)
    return f"{_num(value)} {unit}"


def with_interval(ms: float, ci: Sequence[float], suffix: str = "") -> str:
    """ "812 ms [790, 840]", "3.9 s [3.8, 4.0]": the interval in the median's unit."""
    value, unit = _scaled(ms, ms)
    lo, hi = (_scaled(v, ms)[0] for v in ci)
    return f"{_num(value)} {unit}{suffix} [{_num(lo)}, {_num(hi)}]"


def rate(tokens_per_s: float) -> str:
    """41.5, 9418."""
    return f"{tokens_per_s:.1f}" if tokens_per_s < 1000 else f"{tokens_per_s:.0f}"


def _scaled(ms: float, reference: float) -> tuple[float, str]:
    return (ms / 1000, "s") if reference >= 1000 else (ms, "ms")


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _r(x: float, digits: int = 6) -> float | None:
    return round(float(x), digits) if np.isfinite(x) else None


def _rs(ci: Sequence[float], digits: int = 6) -> list[float | None]:
    return [_r(v, digits) for v in ci]


# ---------------------------------------------------------------------------------------------
# Measurement


def request_inputs(workload: Workload) -> dict[str, dict[str, np.ndarray]]:
    """Feeds of each kind of run of ``workload``'s request (its spec's ``request_prompt`` and
    ``request_generate``): the prefill of the prompt and the decode step at each of
    ``decode_pasts``. Dims the phases set (lengths) are the request's, not the spec's."""
    prompt, generate = workload.spec.request_prompt, workload.spec.request_generate
    check_request(prompt, generate)
    feeds = {PREFILL: workload.prefill(prompt)}
    for past in decode_pasts(prompt, generate):
        feeds[decode_kind(past)] = workload.decode(past)
    return feeds


def estimate_requests(models: Sequence[str | Path], run: RunSettings,
                      workload: Workload | None = None, progress: Progress | None = None,
                      cancelled: CancelCheck | None = None) -> list[RequestEstimate]:
    """Each model's request (the workload's ``request_prompt`` + ``request_generate`` tokens),
    the models' runs interleaved in one child process on the feeds of ``workload`` (made from
    the first model; by default from ``run``'s own feed spec when it is a ``ProfileSettings``):
    runs, warm-up, threads, time budget, optimization level and provider apply."""
    from opstudio.core.isolation import call_isolated

    paths = [str(m) for m in models]
    for p in paths:
        if not Path(p).is_file():
            raise OpstudioError(f"{p}: no such file")
    workload = workload_for(paths, run, workload)
    prompt, generate = workload.spec.request_prompt, workload.spec.request_generate
    if progress:
        progress(0.0, "preparing the request's inputs")
    feeds = request_inputs(workload)
    # the request's own lengths decide when to stop, not --until-stable on another total
    child_settings = dataclasses.replace(RunSettings.from_json(run.to_json()),
                                         until_stable=None).to_json()
    series = call_isolated(_time_in_child, paths, child_settings, feeds, workload.spec.seed,
                           timeout=run.timeout_s, progress=progress, cancelled=cancelled,
                           task="timing the request")
    pasts = decode_pasts(prompt, generate)
    return [estimate(s[PREFILL], {p: s[decode_kind(p)] for p in pasts}, prompt, generate,
                     model=path) for s, path in zip(series, paths)]


def _time_in_child(paths: list[str], settings_json: dict[str, Any],
                   feeds: dict[str, dict[str, np.ndarray]], seed: int,
                   progress: Progress | None = None) -> list[dict[str, list[float]]]:
    import onnxruntime as ort

    from opstudio.core.measure import kv_buffer
    from opstudio.core.measure.rounds import (
        check_feeds,
        fed,
        load_session,
        profile_session_options,
        run_rounds,
    )
    from opstudio.core.model.model_io import load_model

    ort.set_default_logger_severity(4)
    settings = RunSettings.from_json(settings_json)
    report = progress or (lambda f, m: None)
    report(0.01, "loading the models" if len(paths) > 1 else "loading the model")
    opened = [load_session(ort, p, profile_session_options(ort, settings), settings.provider)
              for p in paths]
    # one kind per phase and past, the models side by side in each: profiler's rounds swap
    # the models within a kind ("prefill:0", "prefill:1", "decode@128:0", …)
    shared = [kv_buffer.resolve(settings.kv_buffer,
                                load_model(p, load_external_data=False, name_nodes=False), p)
              for p in paths]
    sessions = {f"{kind}:{i}": fed(sess, check_feeds(sess, kind_feeds), shared[i])
                for kind, kind_feeds in feeds.items() for i, sess in enumerate(opened)}
    report(0.1, "warming up")
    times, _ = run_rounds(sessions, settings, len(paths), 0, report, seed)
    report(1.0, "done")
    return [{kind: list(times[f"{kind}:{i}"]) for kind in feeds} for i in range(len(paths))]
