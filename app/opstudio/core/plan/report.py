"""Reports of a comparison: JSON, CSV and a self-contained HTML page.

The HTML page has no scripts and no external resources (it is opened from disk, mailed around,
attached to CI runs): the charts are inline SVG drawn here, the tables plain HTML.

Every speedup shown is the comparison's paired ratio (``timing.paired_ratio`` via ``compare``):
its verdict (``Ratio.verdict``) decides the words and colour: faster green, slower red, "≈ 1×"
and "too few runs" neutral, the interval in its tooltip.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opstudio import __version__
from opstudio.core.fileio import write_text_atomic
from opstudio.core.measure.compare import operators_changed
from opstudio.core.measure.timing import FASTER, SLOWER
from opstudio.core.model.tensor_groups import group_tensors, shape_text

if TYPE_CHECKING:
    from opstudio.core.measure.compare import Comparison
    from opstudio.core.plan.optimize import StepReport

BEFORE_COLOUR = "#8c9bb0"
AFTER_COLOUR = "#2f7ed8"


def comparison_json(comparison: Comparison, steps: Sequence[StepReport] = ()) -> dict[str, Any]:
    data = comparison.to_json()
    if steps:
        data["steps"] = [_step_json(s) for s in steps]
    return data


def write_json(comparison: Comparison, path: str | Path, steps: Sequence[StepReport] = (), *,
               overwrite: bool = True) -> Path:
    text = json.dumps(comparison_json(comparison, steps), indent=2, default=json_default)
    return write_text_atomic(path, text + "\n", overwrite=overwrite)


def nodes_csv(comparison: Comparison) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "op_type", "before_ms", "after_ms", "speedup", "group", "status",
                     "after_names", "speedup_low", "speedup_high", "significant", "verdict"])
    for row in comparison.nodes:
        r = row.ratio
        writer.writerow([row.name, row.op_type, _csv_ms(row.before_ms), _csv_ms(row.after_ms),
                         "" if row.speedup is None else f"{row.speedup:.4f}",
                         " ".join(row.group), row.status, " ".join(row.after_names),
                         "" if r is None else f"{r.low:.4f}", "" if r is None else f"{r.high:.4f}",
                         "" if r is None else str(r.significant).lower(),
                         "" if r is None else r.verdict])
    return buf.getvalue()


def write_csv(comparison: Comparison, path: str | Path, *, overwrite: bool = True) -> Path:
    return write_text_atomic(path, nodes_csv(comparison), overwrite=overwrite)


def write_html(comparison: Comparison, path: str | Path, steps: Sequence[StepReport] = (), *,
               title: str = "", overwrite: bool = True) -> Path:
    return write_text_atomic(path, render_html(comparison, steps, title=title),
                             overwrite=overwrite)


def render_html(comparison: Comparison, steps: Sequence[StepReport] = (), *, title: str = "",
                top: int = 15) -> str:
    c = comparison
    title = title or f"opstudio report: {Path(c.before_path).name or 'model'}"
    tb, ta = c.before.total_ms, c.after.total_ms
    size_b, size_a = c.size_bytes.get("before", 0), c.size_bytes.get("after", 0)
    rows = c.nodes[:top]
    bars = _bar_chart(
        [r.name for r in rows], [r.before_ms or 0.0 for r in rows],
        [r.after_ms or 0.0 for r in rows], "Per-operator latency (ms, median per run)",
        [_speedup_cell(r.speedup, r.ratio) for r in rows])
    ops = c.op_types()[:top]
    op_bars = _bar_chart([r["op_type"] for r in ops], [r["before_ms"] for r in ops],
                         [r["after_ms"] for r in ops], "Latency per op type (ms)",
                         [_speedup_cell(r["speedup"], r["ratio"]) for r in ops])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='meta'>before: <code>{_e(c.before_path or '(in memory)')}</code> &nbsp; "
        f"after: <code>{_e(c.after_path or '(in memory)')}</code> &nbsp; opstudio {__version__}</p>",
        "<div class='cards'>",
        *_request_cards(c),
        _card("Run time before", f"{_fmt_ms(tb.get('p50'))}", _run_note(c)),
        _card("Run time after", f"{_fmt_ms(ta.get('p50'))}", _run_note(c)),
        _verdict_card(c),
        _card("Model size", f"{_fmt_bytes(size_b)} → {_fmt_bytes(size_a)}",
              "" if not size_b else f"{size_a / size_b:.0%} of before"),
        *_next_token_card(c),
        "</div>",
        *_memory_lines(c),
        "<h2>Accuracy</h2>", _accuracy_table(c),
        "<h2>Where the time went</h2>", bars, op_bars,
        "<h2>Operators</h2>", _changes_note(c), _significance_note(c), _nodes_table(c.nodes),
    ]
    if steps:
        parts += ["<h2>Recipe steps</h2>", _steps_table(steps)]
    parts += _inputs_section(c)
    parts += [
        "<h2>Settings</h2>",
        f"<pre>{_e(json.dumps(c.before.settings.to_json(), indent=2, default=json_default))}</pre>",
        "<p class='meta'>Per-operator times come from onnxruntime's profiler and are reported "
        "against the original model's nodes; the profiler adds a small cost per kernel, so "
        "plain (unprofiled) run times are shown next to the totals.</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _speedup_cell(speedup: float | None, ratio: Any) -> tuple[str, str, str]:
    """(text, css class, tooltip) of a speedup: "≈ 1×" or "too few runs" neutral when the
    ratio gives no verdict of faster or slower."""
    from opstudio.core.measure.compare import interval_text, speedup_label

    text = speedup_label(speedup, ratio)
    if speedup is None or (ratio is not None and not ratio.significant):
        return text, "neutral" if text else "", interval_text(ratio)
    if ratio is None:  # not measured in pairs: the figure, without a verdict
        return text, "", ""
    return text, "good" if ratio.verdict == FASTER else "bad", interval_text(ratio)


def _verdict_card(c: Comparison) -> str:
    """The whole model's speedup (plain runs, else profiled) with its interval and the noise."""
    from opstudio.core.measure.compare import interval_text

    v = c.verdict
    speed = c.plain_speedup if c.plain_ratio is not None else c.speedup
    text, cls, tip = _speedup_cell(speed, v)
    which = "unprofiled" if c.plain_ratio is not None else "profiled"
    note = f"{which}; {interval_text(v)}" if v is not None else which
    if v is not None and v.verdict == SLOWER:
        text = f"{text} ({v.words()})"
    noise = c.noise()
    if noise:
        note += f"; {noise}"
    cls_attr = f" {cls}" if cls else ""
    return (f"<div class='card'><div class='label'>Speedup</div>"
            f"<div class='value{cls_attr}' title='{_e(tip)}'>{_e(text or 'n/a')}</div>"
            f"<div class='note'>{_e(note)}</div></div>")


def _significance_note(c: Comparison) -> str:
    timed = [r for r in c.nodes if r.ratio is not None]
    if not timed:
        return ""
    return f"<p class='meta'>{_e(operators_changed(timed))}. Hover a speedup for its interval.</p>"


def _memory_lines(c: Comparison) -> list[str]:
    """What each model needs of memory to run (``core.memory``)."""
    lines = [f"<p class='meta'>{side}: {_e(p.memory.line())}</p>"
             for side, p in (("before", c.before), ("after", c.after)) if p.memory is not None]
    return ["<h2>Memory</h2>", *lines] if lines else []


def _card(label: str, value: str, note: str) -> str:
    return (f"<div class='card'><div class='label'>{_e(label)}</div>"
            f"<div class='value'>{_e(value)}</div><div class='note'>{_e(note)}</div></div>")


def _next_token_card(c: Comparison) -> list[str]:
    nt = c.accuracy.next_token()
    if nt is None:
        return []
    top1, kl = nt["top1_agreement"], nt["kl_divergence"]
    judged = c.accuracy.judged_on
    on = ("; on synthetic tokens: not a measure of quality" if c.accuracy.synthetic else
          f"; judged on {judged}" if judged else "")
    return [_card("Next-token agreement", "n/a" if top1 is None else f"{top1:.1%}",
                  f"KL {'n/a' if kl is None else f'{kl:.3g}'} nats on "
                  f"{', '.join(nt['outputs'])}{on}")]


def _run_note(c: Comparison) -> str:
    """A decoder's run is one step of it: which."""
    return "median per run, profiled" + (f"; {c.step}" if c.step else "")


def _request_cards(c: Comparison) -> list[str]:
    """A decoder's request before → after: time to first token and tokens/s."""
    from opstudio.core.measure.request import duration, rate

    r = c.request
    if r is None:
        return []
    b, a = r.before, r.after
    about = f"a prompt of {b.prompt} tokens, {b.generate} generated"
    return [_card("Time to first token", f"{duration(b.ttft_ms)} → {duration(a.ttft_ms)}",
                  f"{_ratio_words(r.ttft)}; {about}"),
            _card("Tokens per second", f"{rate(b.tokens_per_s)} → {rate(a.tokens_per_s)}",
                  f"{_ratio_words(r.decode)}; decode steps of the same request")]


def _ratio_words(ratio: Any) -> str:
    from opstudio.core.measure.compare import speedup_label

    return "" if ratio is None else speedup_label(ratio.median, ratio)


def _accuracy_table(c: Comparison) -> str:
    head = "<tr><th>output</th><th>max abs err</th><th>mean abs err</th><th>cosine</th>" \
           "<th>SNR (dB)</th><th>top-1 agreement</th><th>KL (nats)</th></tr>"
    body = []
    for o in c.accuracy.outputs:
        kl = getattr(o, "kl_divergence", None)
        body.append(
            f"<tr><td>{_e(o.name)}</td><td>{_num(o.max_abs_err)}</td><td>{_num(o.mean_abs_err)}</td>"
            f"<td>{_num(o.cosine, 6)}</td><td>{_num(o.snr_db, 1)}</td>"
            f"<td>{'' if o.top1_agreement is None else f'{o.top1_agreement:.1%}'}</td>"
            f"<td>{'' if kl is None else _num(kl)}</td></tr>")
    summary = c.accuracy.summary()
    note = f"<p class='meta'>{_e(summary)} (mean over all positions)</p>" if summary else ""
    return f"{note}<table>{head}{''.join(body)}</table>"


def _changes_note(c: Comparison) -> str:
    text = c.changes_text()
    return f"<p class='meta'>The optimized model's nodes: {_e(text)}.</p>" if text else ""


def _nodes_table(nodes: Sequence[Any]) -> str:
    head = "<tr><th>operator</th><th>op type</th><th>before (ms)</th><th>after (ms)</th>" \
           "<th>speedup</th><th>group</th><th>change</th></tr>"
    body = []
    for r in nodes:
        text, css, tip = _speedup_cell(r.speedup, getattr(r, "ratio", None))
        cls = (f" class='{css}'" if css else "") + (f" title='{_e(tip)}'" if tip else "")
        status = getattr(r, "status", "same")
        after_names = getattr(r, "after_names", [])
        name = _e(r.name) + (f" <span class='meta'>→ {_e(', '.join(after_names))}</span>"
                             if after_names else "")
        before = "added" if r.before_ms is None else f"{r.before_ms:.4f}"
        after = "removed" if r.after_ms is None else f"{r.after_ms:.4f}"
        body.append(
            f"<tr><td>{name}</td><td>{_e(r.op_type)}</td><td>{before}</td>"
            f"<td>{after}</td><td{cls}>{_e(text)}</td>"
            f"<td>{_e(', '.join(r.group))}</td><td>{'' if status == 'same' else _e(status)}</td>"
            "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _inputs_section(c: Comparison) -> list[str]:
    """The inputs both models ran on, a KV cache folded into one row."""
    if not c.before.inputs:
        return []
    rows = "".join(f"<tr><td><code>{_e(g.label)}</code></td><td>{_e(g.dtype or '?')}</td>"
                   f"<td>{_e(shape_text(g.shape))}</td></tr>"
                   for g in group_tensors(c.before.inputs))
    return ["<h2>Inputs</h2>",
            "<p class='meta'>as fed to both models, every run</p>",
            f"<table><tr><th>input</th><th>dtype</th><th>shape</th></tr>{rows}</table>"]


def _steps_table(steps: Sequence[StepReport]) -> str:
    head = "<tr><th>#</th><th>technique</th><th>params</th><th>applied</th><th>skipped</th></tr>"
    body = []
    for s in steps:
        skipped = "; ".join(f"{k}: {v}" for k, v in s.skipped.items())
        body.append(
            f"<tr><td>{s.index}</td><td>{_e(s.technique)}</td>"
            f"<td><code>{_e(json.dumps(s.params, default=json_default))}</code></td>"
            f"<td>{_e(', '.join(s.applied))}</td><td>{_e(skipped)}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _bar_chart(labels: Sequence[str], before: Sequence[float], after: Sequence[float],
               title: str, speedups: Sequence[tuple[str, str, str]] = ()) -> str:
    """Horizontal grouped bars (before grey, after blue) as inline SVG; ``speedups`` are the
    rows' ``_speedup_cell``s."""
    if not labels:
        return ""
    label_w, bar_w, row_h = 260, 460, 30
    height = 40 + row_h * len(labels) + 20
    peak = max([*before, *after, 1e-9])
    out = [f"<svg class='chart' viewBox='0 0 {label_w + bar_w + 120} {height}' "
           f"width='{label_w + bar_w + 120}' height='{height}' role='img'>",
           f"<text x='0' y='18' class='title'>{_e(title)}</text>",
           f"<rect x='{label_w + bar_w - 130}' y='6' width='12' height='12' fill='{BEFORE_COLOUR}'/>"
           f"<text x='{label_w + bar_w - 114}' y='17'>before</text>"
           f"<rect x='{label_w + bar_w - 60}' y='6' width='12' height='12' fill='{AFTER_COLOUR}'/>"
           f"<text x='{label_w + bar_w - 44}' y='17'>after</text>"]
    for i, (name, b, a) in enumerate(zip(labels, before, after)):
        y = 36 + i * row_h
        short = name if len(name) <= 38 else name[:17] + "…" + name[-18:]
        out.append(f"<text x='{label_w - 8}' y='{y + 17}' text-anchor='end'>"
                   f"<title>{_e(name)}</title>{_e(short)}</text>")
        wb, wa = bar_w * b / peak, bar_w * a / peak
        out.append(f"<rect x='{label_w}' y='{y + 2}' width='{wb:.1f}' height='11' "
                   f"fill='{BEFORE_COLOUR}'><title>before {b:.4f} ms</title></rect>")
        out.append(f"<rect x='{label_w}' y='{y + 14}' width='{wa:.1f}' height='11' "
                   f"fill='{AFTER_COLOUR}'><title>after {a:.4f} ms</title></rect>")
        text, css, tip = speedups[i] if i < len(speedups) else ("", "", "")
        tip_el = f"<title>{_e(tip)}</title>" if tip else ""
        out.append(f"<text x='{label_w + max(wb, wa) + 6:.1f}' y='{y + 18}' class='sp'>"
                   f"{tip_el}{b:.3f} → {a:.3f} ms <tspan class='{css or 'plain'}'>{_e(text)}"
                   "</tspan></text>")
    out.append("</svg>")
    return "".join(out)


def _step_json(step: StepReport) -> dict[str, Any]:
    return {"index": step.index, "technique": step.technique, "params": step.params,
            "applied": list(step.applied), "skipped": dict(step.skipped),
            "details": step.details, "notes": list(step.notes),
            "seconds": round(step.seconds, 3)}


def json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if abs(x) != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}f}"


def _csv_ms(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def _fmt_ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} ms"


def _fmt_bytes(n: int) -> str:
    for factor, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {suffix}"
    return f"{n} B"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1f2933;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;
border-bottom:1px solid #e4e7eb;padding-bottom:.3rem}
.meta{color:#616e7c;font-size:.85rem}code{font-size:.85rem}
.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{border:1px solid #e4e7eb;border-radius:8px;padding:.8rem 1rem;min-width:180px}
.card .label{color:#616e7c;font-size:.8rem}.card .value{font-size:1.4rem;font-weight:600}
.card .note{color:#616e7c;font-size:.8rem}
table{border-collapse:collapse;width:100%;font-size:.85rem}
th,td{border-bottom:1px solid #e4e7eb;padding:.3rem .5rem;text-align:left}
th{background:#f5f7fa}td.good{color:#1b7f3b;font-weight:600}td.bad{color:#b42318;font-weight:600}
td.neutral,.value.neutral{color:#7b8794}.value.good{color:#1b7f3b}.value.bad{color:#b42318}
svg tspan.good{fill:#1b7f3b;font-weight:600}svg tspan.bad{fill:#b42318;font-weight:600}
svg tspan.neutral{fill:#9aa5b1}
svg.chart{display:block;margin:1rem 0;font-size:12px}svg .title{font-weight:600;font-size:13px}
svg .sp{fill:#3e4c59;font-size:11px}pre{background:#f5f7fa;padding:.8rem;font-size:.8rem}
"""
