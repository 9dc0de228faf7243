"""opstudio's INT4 against onnxruntime-genai's builder INT4, on the builder's own fp32 export.

The journey an LLM user takes: the builder's fp32 export of a Qwen2.5-0.5B-shaped decoder (24
layers by default, random weights, GroupQueryAttention, external data) → ``opstudio optimize``
with ``int4-weight`` on every MatMul and the embedding (the defaults: block 32, symmetric, the accuracy level
measured fastest here) → compared with what the builder itself writes for ``-p int4``.

Prefill (a prompt of 128 tokens, past 0) and decode (one token after a past of 512, the past
being each model's own KV cache from a prefill of the same prompt) are timed with the three models
taking turns round by round in one process (``opstudio.core.measure.timing``), and every ratio is the
median of per-round ratios with its 95 % bootstrap interval. Accuracy is the logits' cosine and
next-token agreement against fp32 (random weights: agreement means little, cosine is the check).

    python benchmarks/bench_llm_int4.py [--layers 24] [--cache DIR] [--rounds 30]

The exports are built on first use by ``llm_exports.py`` (needs torch, transformers and
onnxruntime-genai; see that file).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_exports import DEFAULT_CACHE, genai_export
from opstudio.core.measure.accuracy import compare_outputs
from opstudio.core.measure.timing import interleaved_times, paired_ratio, session
from opstudio.core.plan.optimize import optimize_file
from opstudio.core.plan.recipe import Recipe

INT4_ALL = {"version": 1, "steps": [
    {"op_types": ["MatMul", "Gather"], "technique": "int4-weight", "params": {}}]}


def feeds(config: dict, tokens: np.ndarray, past: dict[str, np.ndarray] | None,
          past_len: int) -> dict[str, np.ndarray]:
    decoder = config["model"]["decoder"]
    layers, kv, head = (decoder["num_hidden_layers"], decoder["num_key_value_heads"],
                        decoder["head_size"])
    out = {"input_ids": tokens[None, :].astype(np.int64),
           "attention_mask": np.ones((1, past_len + tokens.size), np.int64)}
    for i in range(layers):
        for kind in ("key", "value"):
            name = f"past_key_values.{i}.{kind}"
            out[name] = (past[f"present.{i}.{kind}"] if past is not None
                         else np.zeros((1, kv, 0, head), np.float32))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    parser.add_argument("--prompt", type=int, default=128, help="prefill length")
    parser.add_argument("--past", type=int, default=512, help="past length of the decode step")
    parser.add_argument("--rounds", type=int, default=30, help="decode rounds (prefill: a third)")
    args = parser.parse_args(argv)

    fp32 = genai_export(args.layers, "fp32", cache=args.cache)
    builder = genai_export(args.layers, "int4", cache=args.cache)
    ours = fp32.parent.parent / "opstudio_int4" / "model.onnx"
    if not ours.exists():
        ours.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        optimize_file(fp32, Recipe.from_json(INT4_ALL), ours)
        print(f"opstudio optimize (int4-weight on every MatMul and the embedding): "
              f"{time.perf_counter() - started:.1f} s, peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    config = json.loads((fp32.parent / "genai_config.json").read_text())
    vocab = config["model"]["vocab_size"]
    models = {"fp32": fp32, "builder int4": builder, "opstudio int4": ours}
    sessions = {name: session(path) for name, path in models.items()}

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, args.prompt)
    long_prompt = rng.integers(0, vocab, args.past)
    step_token = rng.integers(0, vocab, 1)
    prefill_feeds = feeds(config, prompt, None, 0)
    names = [o.name for o in sessions["fp32"].get_outputs()]

    # decode after each model's own past: the KV cache its prefill of the long prompt wrote
    decode_feeds: dict[str, dict[str, np.ndarray]] = {}
    outputs: dict[str, dict[str, dict[str, np.ndarray]]] = {"prefill": {}, "decode": {}}
    for name, s in sessions.items():
        present = dict(zip(names, s.run(None, feeds(config, long_prompt, None, 0))))
        decode_feeds[name] = feeds(config, step_token, present, args.past)
        outputs["decode"][name] = {"logits": s.run(["logits"], decode_feeds[name])[0]}
        outputs["prefill"][name] = {"logits": s.run(["logits"], prefill_feeds)[0]}

    rows = []
    for phase, rounds in (("prefill", max(8, args.rounds // 3)), ("decode", args.rounds)):
        if phase == "prefill":
            times = interleaved_times(sessions, prefill_feeds, rounds=rounds, warmup=1)
        else:
            times = _interleaved_own_feeds(sessions, decode_feeds, rounds)
        for name in models:
            acc = compare_outputs(outputs[phase]["fp32"], outputs[phase][name]).outputs[0]
            vs_fp32 = paired_ratio(times["fp32"], times[name])
            vs_builder = paired_ratio(times["builder int4"], times[name])
            rows.append((phase, name, float(np.median(times[name])), vs_fp32, vs_builder,
                         acc.cosine, acc.top1_agreement))

    print(f"\n{args.layers}-layer Qwen2.5-0.5B-shaped export, prefill {args.prompt} tokens, "
          f"decode 1 token after {args.past}; {len(times['fp32'])} decode rounds, interleaved")
    print(f"{'phase':8} {'model':14} {'median ms':>10} {'× vs fp32 [95% CI]':>26} "
          f"{'× vs builder [95% CI]':>26} {'cosine':>9} {'top-1':>6}")
    for phase, name, ms, a, b, cos, top1 in rows:
        print(f"{phase:8} {name:14} {ms:10.2f} {_ci(a):>26} {_ci(b):>26} {cos:9.5f} "
              f"{'' if top1 is None else f'{top1:.2f}':>6}")
    sizes = {name: sum(f.stat().st_size for f in p.parent.glob("model.onnx*"))
             for name, p in models.items()}
    print("size on disk: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sizes.items()))
    return 0


def _interleaved_own_feeds(sessions: dict, per_model: dict[str, dict], rounds: int
                           ) -> dict[str, np.ndarray]:
    """Like ``interleaved_times`` but each model runs on its own feeds (its own KV cache)."""
    for name, s in sessions.items():
        s.run(None, per_model[name])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for i in range(rounds):
        for name in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            sessions[name].run(None, per_model[name])
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: np.asarray(v) for k, v in times.items()}


def _ci(r) -> str:
    return f"{r.median:.2f}× [{r.low:.2f}, {r.high:.2f}]"


if __name__ == "__main__":
    raise SystemExit(main())
