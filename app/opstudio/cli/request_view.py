"""``--request`` of ``profile`` and ``compare``: time to first token, tokens/s and the time of
a whole request of a decoder with a KV cache (``opstudio.core.measure.request``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from opstudio.core.measure.request import (
    DEFAULT_GENERATE,
    DEFAULT_PROMPT,
    RequestComparison,
    RequestEstimate,
    decode_pasts,
    rate,
    require_kv_cache,
    with_interval,
)


def add_request_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("request (decoder with a KV cache)")
    group.add_argument("--request", action="store_true",
                       help="also estimate a request: time to first token (the prefill of the "
                            "prompt), decode ms/token and tokens/s, and the whole request's "
                            "time, each with its 95%% interval")
    group.add_argument("--prompt", type=int, default=None, metavar="P",
                       help=f"prompt tokens of the request (default {DEFAULT_PROMPT}); "
                            "implies --request")
    group.add_argument("--generate", type=int, default=None, metavar="G",
                       help=f"tokens generated (default {DEFAULT_GENERATE}); implies --request")


def apply_request_args(args: argparse.Namespace, settings: Any, models: Sequence[str]) -> bool:
    """Put ``--request/--prompt/--generate`` in ``settings``; refuse a model without a KV
    cache before anything is timed. True when a request is to be estimated."""
    from opstudio.core.model.model_io import load_model

    prompt, generate = getattr(args, "prompt", None), getattr(args, "generate", None)
    if not (getattr(args, "request", False) or prompt is not None or generate is not None):
        return False
    settings.request = True
    settings.request_prompt = DEFAULT_PROMPT if prompt is None else prompt
    settings.request_generate = DEFAULT_GENERATE if generate is None else generate
    settings.validate(check_provider=False)
    for path in models:
        require_kv_cache(load_model(path, load_external_data=False), path)
    return True


def _heading(prompt: int, generate: int) -> str:
    first, last = decode_pasts(prompt, generate)
    return (f"request: a prompt of {prompt} tokens, {generate} generated (the first by the "
            f"prefill, each other by a decode step; the step timed after a past of {first} "
            f"and {last} tokens, linear in between)")


def print_request(r: RequestEstimate, file: Any = None) -> None:
    file = file or sys.stdout
    print(_heading(r.prompt, r.generate), file=file)
    print(f"  {r.describe()}", file=file)
    _print_disturbed(r, file)


def print_request_comparison(c: RequestComparison, file: Any = None) -> None:
    from opstudio.core.measure.compare import speedup_label

    file = file or sys.stdout
    b, a = c.before, c.after

    def ratio(r: Any) -> str:
        if r is None:
            return ""
        return f"{speedup_label(r.median, r)} [{r.low:.2f}, {r.high:.2f}]"

    print(_heading(b.prompt, b.generate) + ", before → after:", file=file)
    rows = [
        ("time to first token", f"{with_interval(b.ttft_ms, b.ttft_ci)} → "
                                f"{with_interval(a.ttft_ms, a.ttft_ci)}", ratio(c.ttft)),
        ("decode", f"{with_interval(b.decode_ms, b.decode_ci, '/token')} → "
                   f"{with_interval(a.decode_ms, a.decode_ci, '/token')}; "
                   f"{rate(b.tokens_per_s)} → {rate(a.tokens_per_s)} tokens/s", ratio(c.decode)),
        (f"a request of {b.prompt}+{b.generate} tokens",
         f"{with_interval(b.total_ms, b.total_ci)} → {with_interval(a.total_ms, a.total_ci)}",
         ratio(c.total)),
    ]
    width = max(len(r[0]) for r in rows)
    for label, values, speedup in rows:
        print(f"  {label:<{width}}  {values}  ({speedup})" if speedup else
              f"  {label:<{width}}  {values}", file=file)
    if b.disturbed or a.disturbed:
        print(f"  the machine was busy: {b.disturbed} (before) and {a.disturbed} (after) of "
              f"{b.rounds} rounds disturbed; figures from the quiet rounds", file=file)


def _print_disturbed(r: RequestEstimate, file: Any) -> None:
    if r.disturbed:
        print(f"  the machine was busy: {r.disturbed} of {r.rounds} rounds disturbed; figures "
              "from the quiet rounds", file=file)
