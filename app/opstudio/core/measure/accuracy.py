"""How far an optimized model's outputs are from the original's on the same inputs.

Per output: max and mean absolute error, cosine similarity and SNR (computed on the flattened
arrays in float64), the rate of exactly equal elements, and top-1 agreement for classifier-like
outputs (a float output whose last dim has ≥ 2 entries: ``[batch, classes]`` or
``[batch, seq, vocab]``; the share of rows whose argmax is the same).

A language model's *logits* (a float output of rank ≥ 2 named ``…logits…``, or whose last axis
has ≥ 1000 entries: the vocabulary) also get the mean KL divergence ``KL(p_before ‖ p_after)``
in nats of the next-token distributions, over every position; the report sums them up in one
line ("next-token agreement 0.94, KL 0.031 nats on logits"). A KV-cache output (``present.*``,
``*key*``/``*value*``, ``*cache*``) is a tensor of keys and values, not a distribution: it gets
neither top-1 nor KL. One the optimized model stores quantized (int8 codes, kv-cache) is not
compared at all: the logits computed from it are.

``snr_db = 10·log10(Σ ref² / Σ (new − ref)²)`` is ``inf`` when the outputs are identical; JSON has
no infinity, so ``to_json`` writes ``null`` there (and ``"identical": true`` says why). Outputs
that are not floating point (ids, masks, counts) get only the absolute errors and the equality
rate; their cosine, SNR and top-1 are ``null``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.model.runtime import create_session, session_options

# Exporters name logits "logits"; a differently named rank ≥ 2 float output at least this wide is
# taken for a vocabulary unless its name says it holds states or embeddings (a 1024-wide
# last_hidden_state is no distribution).
VOCAB_MIN = 1000
_KV_NAME = re.compile(r"present|past|cache|key_values|(^|[._/-])(key|value)s?([._/-]|\d|$)",
                      re.IGNORECASE)
_NOT_VOCAB_NAME = re.compile(r"hidden|state|embed|feature|pool", re.IGNORECASE)
# What an accuracy report judged on made-up token ids says it was judged on (core.text_prompt)
SYNTHETIC = "synthetic tokens"
# Rows of log-softmax computed at a time: bounds the float64 copies of a [seq, 150k] output.
_KL_CHUNK_ELEMENTS = 1 << 22


@dataclass
class OutputAccuracy:
    name: str
    shape: list[int]
    max_abs_err: float
    mean_abs_err: float
    cosine: float | None
    snr_db: float | None  # inf when identical
    top1_agreement: float | None
    equal_rate: float = 1.0  # share of elements exactly equal
    kl_divergence: float | None = None  # mean over positions, nats; logits outputs only
    kind: str = ""  # "logits", "kv_cache" or "" (anything else)

    @property
    def identical(self) -> bool:
        return self.equal_rate == 1.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape),
                "max_abs_err": _finite(self.max_abs_err), "mean_abs_err": _finite(self.mean_abs_err),
                "cosine": _finite(self.cosine), "snr_db": _finite(self.snr_db),
                "top1_agreement": self.top1_agreement,
                "kl_divergence": _finite(self.kl_divergence), "kind": self.kind,
                "equal_rate": self.equal_rate, "identical": self.identical}


@dataclass
class AccuracyReport:
    outputs: list[OutputAccuracy] = field(default_factory=list)
    # what the outputs were computed on, in words (core.text_prompt.Judging.judged_on): "the
    # built-in text (312 tokens)", an inputs file's name, "synthetic tokens"; "" when unsaid
    judged_on: str = ""

    @property
    def synthetic(self) -> bool:
        """Judged on made-up token ids: next-token figures then measure nothing."""
        return self.judged_on == SYNTHETIC

    def to_json(self) -> dict[str, Any]:
        return {"outputs": [o.to_json() for o in self.outputs], "next_token": self.next_token(),
                "judged_on": self.judged_on or None}

    def logits(self) -> list[OutputAccuracy]:
        return [o for o in self.outputs if o.kind == "logits"]

    def next_token(self) -> dict[str, Any] | None:
        """Model-level next-token figures over the logits outputs (the worst of them when there
        are several), or None for a model without logits."""
        outs = self.logits()
        if not outs:
            return None
        top1 = [o.top1_agreement for o in outs if o.top1_agreement is not None]
        kl = [o.kl_divergence for o in outs if o.kl_divergence is not None]
        return {"outputs": [o.name for o in outs],
                "top1_agreement": min(top1) if top1 else None,
                "kl_divergence": _finite(max(kl)) if kl else None}

    def summary(self) -> str:
        """One line for a terminal or a status bar; "" for a model without logits."""
        nt = self.next_token()
        if nt is None:
            return ""
        top1, kl = nt["top1_agreement"], nt["kl_divergence"]
        names = ", ".join(nt["outputs"])
        line = (f"next-token agreement {'n/a' if top1 is None else f'{top1:.2f}'}, "
                f"KL {'n/a' if kl is None else f'{kl:.3g}'} nats on {names}")
        if self.synthetic:
            return f"{line}, on synthetic tokens: not a measure of quality"
        return f"{line}, judged on {self.judged_on}" if self.judged_on else line

    def worst_cosine(self) -> float | None:
        values = [o.cosine for o in self.outputs if o.cosine is not None]
        return min(values) if values else None


def compare_outputs(ref: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> AccuracyReport:
    """Metrics for every output of ``ref`` (in its order); ``new`` must have the same outputs."""
    outputs: list[OutputAccuracy] = []
    for name, a in ref.items():
        if name not in new:
            raise OpstudioError(f"output '{name}' is missing from the optimized model")
        b = np.asarray(new[name])
        if _KV_NAME.search(name) and np.asarray(a).dtype != b.dtype and \
                not np.issubdtype(b.dtype, np.floating):
            continue  # a quantized cache (kv-cache): codes, not values; the logits tell
        outputs.append(_compare_one(name, np.asarray(a), np.asarray(new[name])))
    return AccuracyReport(outputs)


def _compare_one(name: str, a: np.ndarray, b: np.ndarray) -> OutputAccuracy:
    if a.shape != b.shape:
        raise OpstudioError(f"output '{name}': shape {list(b.shape)} differs from the "
                            f"original's {list(a.shape)}")
    shape = [int(d) for d in a.shape]
    is_float = np.issubdtype(a.dtype, np.floating) and np.issubdtype(b.dtype, np.floating)
    kind = output_kind(name, a) if is_float else ""
    if a.size == 0:
        return OutputAccuracy(name, shape, 0.0, 0.0, None, None, None, 1.0, kind=kind)
    equal_rate = float(np.mean(a == b)) if not is_float else float(
        np.mean((a == b) | (np.isnan(a) & np.isnan(b))))
    numeric = np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_
    if not numeric:
        return OutputAccuracy(name, shape, math.nan, math.nan, None, None, None, equal_rate)
    x = a.astype(np.float64).ravel()
    y = b.astype(np.float64).ravel()
    err = y - x
    abs_err = np.abs(err)
    max_abs, mean_abs = float(abs_err.max()), float(abs_err.mean())
    if not is_float:
        return OutputAccuracy(name, shape, max_abs, mean_abs, None, None, None, equal_rate)
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        cosine = 1.0
    elif nx == 0.0 or ny == 0.0 or not (math.isfinite(nx) and math.isfinite(ny)):
        cosine = 0.0 if math.isfinite(nx) and math.isfinite(ny) else math.nan
    else:
        cosine = float(np.dot(x, y) / (nx * ny))
    signal, noise = float(np.sum(x * x)), float(np.sum(err * err))
    if noise == 0.0:
        snr = math.inf
    elif signal == 0.0:
        snr = -math.inf
    else:
        snr = 10.0 * math.log10(signal / noise)
    top1 = kl = None
    if kind != "kv_cache" and a.ndim >= 1 and a.shape[-1] >= 2:
        top1 = top1_agreement(a, b)
    if kind == "logits":
        kl = mean_kl_divergence(a, b)
    return OutputAccuracy(name, shape, max_abs, mean_abs, cosine, snr, top1, equal_rate,
                          kl_divergence=kl, kind=kind)


def output_kind(name: str, value: np.ndarray) -> str:
    """What a float output holds, from its name and shape: "kv_cache", "logits" or "" (other)."""
    if _KV_NAME.search(name):
        return "kv_cache"
    if value.ndim < 2 or value.shape[-1] < 2:
        return ""
    if "logit" in name.lower() or (value.shape[-1] >= VOCAB_MIN
                                   and not _NOT_VOCAB_NAME.search(name)):
        return "logits"
    return ""


def top1_agreement(ref: np.ndarray, new: np.ndarray) -> float:
    """Share of positions (all but the last axis) whose argmax over the last axis agrees."""
    return float(np.mean(agreement_per_position(ref, new)))


def agreement_per_position(ref: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Whether the argmax over the last axis agrees, at every position."""
    rows_a = ref.reshape(-1, ref.shape[-1])
    rows_b = new.reshape(-1, new.shape[-1])
    return np.argmax(rows_a, axis=-1) == np.argmax(rows_b, axis=-1)


def mean_kl_divergence(ref: np.ndarray, new: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) ‖ softmax(new)) along the last axis, in nats
    (see ``kl_per_position``)."""
    per = kl_per_position(ref, new)
    return float(per.mean()) if per.size else 0.0


def kl_per_position(ref: np.ndarray, new: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) ‖ softmax(new)) along the last axis at every position, in nats.

    Log-softmax in float64 with the row maximum subtracted, so logits of any size are safe;
    tokens the reference gives probability 0 (logit -inf) add nothing, tokens only the
    reference can emit make it infinite."""
    vocab = ref.shape[-1]
    rows_a = ref.reshape(-1, vocab)
    rows_b = new.reshape(-1, vocab)
    n = rows_a.shape[0]
    out = np.zeros(n, np.float64)
    step = max(1, _KL_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, step):
        lp = _log_softmax(rows_a[start:start + step])
        lq = _log_softmax(rows_b[start:start + step])
        p = np.exp(lp)
        with np.errstate(invalid="ignore"):
            terms = np.where(p > 0, p * (lp - lq), 0.0)
        out[start:start + step] = np.maximum(terms.sum(axis=-1), 0.0)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    peak = np.max(x, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    shifted = x - peak
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def run_outputs(model_or_path: onnx.ModelProto | str | os.PathLike[str],
                inputs: Mapping[str, np.ndarray], threads: int = 1,
                opt_level: str = "all") -> dict[str, np.ndarray]:
    """All outputs of one onnxruntime run on the CPU, by name, in the model's order."""

    from opstudio.core.model.phases import fit_cache_feed

    # outputs, not speed: without prepacked copies, weights mapped from a file stay there
    # instead of taking as much anonymous memory again
    options = session_options(threads=threads, inter_threads=1, opt_level=opt_level,
                              prepacking=False)
    try:
        session = create_session(model_or_path, options)
        names = [o.name for o in session.get_outputs()]
        feeds = {i.name: fit_cache_feed(i, inputs[i.name]) for i in session.get_inputs()
                 if i.name in inputs}
        values = session.run(names, feeds)
    except Exception as exc:  # onnxruntime's own exception types
        text = str(exc).strip().splitlines()
        raise OpstudioError(f"onnxruntime could not run the model "
                            f"({text[0][:300] if text else type(exc).__name__})") from exc
    return dict(zip(names, values))


def evaluate(before: onnx.ModelProto | str | os.PathLike[str],
             after: onnx.ModelProto | str | os.PathLike[str],
             inputs: Mapping[str, np.ndarray], threads: int = 1) -> AccuracyReport:
    """Run both models on ``inputs`` and compare their outputs."""
    return compare_outputs(run_outputs(before, inputs, threads), run_outputs(after, inputs, threads))


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return value


def agreement_low(share: float, positions: int | None, confidence: float) -> float:
    """The one-sided lower bound (Wilson score) of an agreement rate measured as ``share`` of
    ``positions``; the share itself when the count is unknown or the confidence is 0.5."""
    z = NormalDist().inv_cdf(confidence)
    if not positions or z <= 0:
        return share
    n = float(positions)
    centre = share + z * z / (2 * n)
    spread = z * math.sqrt(max(share * (1 - share), 0.0) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)
