"""KV-cache quantization (``kv-cache``) on a trained decoder: next-token agreement after a long
real past, and the decode step's time.

The model is SmolLM2-135M-Instruct as optimum exports it, in
``~/.cache/opstudio-bench/llm/trained_hf/`` with ``prompt_b.npz`` (the calibration prompt) and
its tokenizer beside it. ``fuse`` turns its attention into GroupQueryAttention (the reference,
fp32 cache), then ``kv-cache`` stores that cache in int8 (``--bits 4``: packed int4), calibrated
on ``prompt_b.npz`` as ``opstudio optimize --inputs`` does. A text of at least ``--past`` +
``--steps`` tokens (``--text``; default the GFDL from /usr/share/common-licenses) is prefilled for
``--past`` tokens, then each model decodes the next ``--steps`` tokens one at a time from its own
cache (teacher-forced: both read the text's tokens): agreement is the share of those steps, plus
the prefill's last position, whose argmax equals the reference's. Then both are timed at one
decode step after a synthetic past of ``--past`` tokens, rounds interleaved in one child
process (``core.measure.compare.compare_models``, as ``opstudio compare A B --phase decode --past N``).

    python benchmarks/bench_kv_cache.py [--model PATH] [--past 2048] [--steps 64] [--bits 8]
                                        [--runs 10] [--out DIR] [--text FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from opstudio.core.measure.compare import compare_models, interval_text
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.model.phases import cache_zeros
from opstudio.core.model.runtime import create_session
from opstudio.core.plan.optimize import optimize_file
from opstudio.core.plan.recipe import Recipe

FUSE_ALL = {"op_types": ["Pow", "Neg"], "technique": "fuse"}
DEFAULT_MODEL = Path.home() / ".cache/opstudio-bench/llm/trained_hf/model.onnx"
DEFAULT_TEXT = Path("/usr/share/common-licenses/GFDL-1.3")


def _decode(path: Path, tokens: np.ndarray, past: int, steps: int) -> np.ndarray:
    """The argmax after the first ``past`` tokens, then after each of the next ``steps``."""
    session = create_session(str(path))
    cache = {i.name: i for i in session.get_inputs() if i.name.startswith("past_key_values")}
    dtype = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
    feeds = {name: cache_zeros((1, arg.shape[1], 0, arg.shape[3]), dtype[arg.type])
             for name, arg in cache.items()}
    names = [o.name for o in session.get_outputs()]
    picks = []
    start, end = 0, past
    while end <= past + steps:
        feeds.update(input_ids=tokens[None, start:end],
                     attention_mask=np.ones((1, end), np.int64),
                     position_ids=np.arange(start, end, dtype=np.int64)[None])
        outs = dict(zip(names, session.run(None, feeds)))
        picks.append(int(outs["logits"][0, -1].argmax()))
        for name in cache:
            feeds[name] = outs[name.replace("past_key_values", "present")]
        start, end = end, end + 1
    return np.array(picks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--past", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--bits", type=int, default=8, choices=(8, 4))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/opstudio-bench-kv-cache"))
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args(argv)
    for path in (args.model, args.text):
        if not path.exists():
            print(f"{path}: not found", file=sys.stderr)
            return 1
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.model.parent / "tokenizer.json"))
    tokens = np.array(tokenizer.encode(args.text.read_text(encoding="utf-8")).ids, np.int64)
    if len(tokens) < args.past + args.steps:
        print(f"{args.text}: {len(tokens)} tokens, fewer than --past + --steps", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    fused, quantized = args.out / "fused.onnx", args.out / f"kv{args.bits}.onnx"
    with np.load(args.model.parent / "prompt_b.npz") as data:
        prompt = {k: data[k] for k in data.files}
    optimize_file(args.model, Recipe.from_json({"version": 1, "steps": [FUSE_ALL]}), fused,
                  overwrite=True)
    kv_step = {"name_pattern": "*/self_attn/Softmax", "technique": "kv-cache",
               "params": {"bits": args.bits}}
    result = optimize_file(args.model, Recipe.from_json({"version": 1,
                                                         "steps": [FUSE_ALL, kv_step]}),
                           quantized, overwrite=True, calibration=[prompt])
    print(f"kv-cache {args.bits}-bit: {'; '.join(result.steps[1].notes)}")

    ref = _decode(fused, tokens, args.past, args.steps)
    got = _decode(quantized, tokens, args.past, args.steps)
    print(f"next-token agreement after a past of {args.past} tokens of {args.text.name}, "
          f"{len(ref)} positions: {np.mean(ref == got):.3f} "
          f"(the text's own next token: fp32 {np.mean(ref[:-1] == tokens[args.past:][:len(ref) - 1]):.3f}, "
          f"{args.bits}-bit {np.mean(got[:-1] == tokens[args.past:][:len(got) - 1]):.3f})")

    settings = ProfileSettings(runs=args.runs, phase="decode", past=args.past)
    pair = compare_models(fused, quantized, settings)
    print(f"\n{pair.step}, {pair.before.runs} rounds, interleaved; {pair.noise()}")
    for side, p in (("fp32 cache", pair.before), (f"int{args.bits} cache", pair.after)):
        print(f"{side:12} plain p50 {(p.plain_ms or {}).get('p50', float('nan')):8.2f} ms, "
              f"profiled p50 {p.total_ms['p50']:8.2f} ms")
    for label, ratio in (("plain", pair.plain_ratio), ("profiled", pair.total_ratio)):
        median = "n/a" if ratio is None else f"{ratio.median:.2f}×"
        print(f"speed-up ({label} runs): {median}, {interval_text(ratio)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
