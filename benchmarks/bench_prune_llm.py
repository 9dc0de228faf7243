"""Joint structured pruning of every MLP of a trained LLM: decode speedup and next-token agreement,
channels ranked by weight magnitude vs by activations (Wanda-style).

The model is SmolLM2-135M-Instruct as an HF-style ONNX decoder (``llm_exports.trained_decoder``:
30 layers, SwiGLU MLPs 576 → 1536 → 576, fp16 weights behind Cast, KV-cache inputs), or any
decoder given with ``--model`` that has ``prompt_a.npz`` and ``prompt_b.npz`` beside it. One
``prune`` step names every down_proj (``--pattern``); the pass rewrites each whole MLP, removing
the same ``--sparsity`` of intermediate channels from gate_proj, up_proj and down_proj. The
activation ranking calibrates on prompt_a; both are judged on prompt_b, which it never saw:
next-token top-1 agreement with the original at every position, and mean KL.

Speed is one decode step after prompt_b's prefill (past = the original's KV cache, the same for
every variant since attention is untouched), the variants timed in alternation with the original
in this process (``timing.interleaved_times``), reported as the median paired ratio with its
95 % bootstrap interval; the prefill of prompt_b likewise.

    python benchmarks/bench_prune_llm.py [--model PATH] [--cache DIR] [--sparsity 0.25]
        [--pattern '*/mlp/down_proj/MatMul'] [--rounds 40] [--sparsity 0.1,0.25]

With ``--pattern '*/self_attn/o_proj/MatMul' --sparsity 0.34`` it removes one of the three
query heads of every KV group instead (attention heads, ``passes/_heads``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from opstudio.core.measure.accuracy import compare_outputs, run_outputs
from opstudio.core.measure.timing import interleaved_times, paired_ratio, session
from opstudio.core.model.model_io import load_model
from opstudio.core.plan.optimize import optimize
from opstudio.core.plan.recipe import Recipe, Step


def load_feeds(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def decode_feeds(prefill: dict[str, np.ndarray],
                 outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One decode step after ``prefill``: its greedy next token, the cache it produced."""
    ids = prefill["input_ids"]
    past = ids.shape[-1]
    token = int(np.argmax(outputs["logits"][0, -1]))
    feeds = {"input_ids": np.array([[token]], dtype=ids.dtype),
             "attention_mask": np.ones((1, past + 1), dtype=prefill["attention_mask"].dtype)}
    if "position_ids" in prefill:
        feeds["position_ids"] = np.array([[past]], dtype=prefill["position_ids"].dtype)
    for name in prefill:
        if name.startswith("past_key_values."):
            feeds[name] = outputs["present." + name[len("past_key_values."):]]
    return feeds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a decoder with prompt_a/b.npz beside it "
                   "(default: the trained HF-style SmolLM2 export, built if missing)")
    p.add_argument("--cache", help="llm_exports cache folder (default ~/.cache/opstudio-bench/llm)")
    p.add_argument("--sparsity", default="0.25", help="fraction of each MLP's intermediate "
                   "channels (or of each KV group's query heads, with a pattern naming "
                   "attention projections) removed; a comma-separated list runs each")
    p.add_argument("--pattern", default="*/mlp/down_proj/MatMul")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads "
                   "(0: its default)")
    args = p.parse_args()

    if args.model is None:
        from llm_exports import trained_decoder

        args.model = trained_decoder("hf", "fp16", cache=args.cache)
    calib = args.model.parent / "prompt_a.npz"
    held_out = args.model.parent / "prompt_b.npz"
    model = load_model(args.model)
    feeds_a, feeds_b = load_feeds(calib), load_feeds(held_out)
    ref_b, ref_a = run_outputs(model, feeds_b), run_outputs(model, feeds_a)
    decode = decode_feeds(feeds_b, ref_b)
    print(f"{args.model}: {model.ByteSize() / 2**20:.1f} MiB; calibration {calib.name}, held "
          f"out {held_out.name} ({feeds_b['input_ids'].shape[-1]} positions); decode step "
          f"with past {decode['attention_mask'].shape[-1] - 1}", flush=True)

    variants = {}
    rows = []
    for sparsity, importance in [(float(x), i) for x in args.sparsity.split(",")
                                 for i in ("magnitude", "activation")]:
        label = f"{importance} {sparsity:.0%}"
        params: dict = {"structured": True, "sparsity": sparsity, "importance": importance}
        if importance == "activation":
            params.update(calibration=str(calib), samples=1)
        recipe = Recipe([Step("prune", params, name_pattern=[args.pattern])])
        started = time.perf_counter()
        result = optimize(model, recipe)
        seconds = time.perf_counter() - started
        (step,) = result.steps
        # the node that led each joint rewrite (an MLP's channels, an attention's heads)
        leaders = [d for d in step.details.values() if "params_before" in d]
        before = sum(d["params_before"] for d in leaders)
        after = sum(d["params_after"] for d in leaders)
        on_b = compare_outputs(ref_b, run_outputs(result.model, feeds_b)).next_token()
        on_a = compare_outputs(ref_a, run_outputs(result.model, feeds_a)).next_token()
        variants[label] = result.model
        rows.append((label, len(leaders), before, after, result.model.ByteSize(),
                     on_b, on_a, seconds))
        print(f"  {label}: {len(leaders)} MLPs/attentions pruned in {seconds:.1f} s",
              flush=True)
        for note in step.notes:
            print(f"    {note}")

    sessions = {"original": session(model, args.threads)}
    sessions.update({k: session(v, args.threads) for k, v in variants.items()})
    decode_ms = interleaved_times(sessions, decode, rounds=args.rounds)
    prefill_ms = interleaved_times(sessions, feeds_b, rounds=max(args.rounds // 4, 10))

    header = (f"{'importance':15} {'n':>4} {'params':>15} {'size MiB':>8} "
              f"{'top-1 B':>7} {'KL B':>6} {'top-1 A':>7} {'decode ms':>9} "
              f"{'decode speedup':>26} {'prefill speedup':>26}")
    print(header)
    print("-" * len(header))
    base = np.median(decode_ms["original"])
    print(f"{'original':15} {'':>4} {'':>15} {model.ByteSize() / 2**20:8.1f} {1:7.3f} "
          f"{0:6.3f} {1:7.3f} {base:9.2f}")
    for label, n, before, after, size, on_b, on_a, _ in rows:
        dec = paired_ratio(decode_ms["original"], decode_ms[label])
        pre = paired_ratio(prefill_ms["original"], prefill_ms[label])
        print(f"{label:15} {n:4d} {before / 1e6:6.2f}M→{after / 1e6:5.2f}M "
              f"{size / 2**20:8.1f} {on_b['top1_agreement']:7.3f} "
              f"{on_b['kl_divergence']:6.3f} {on_a['top1_agreement']:7.3f} "
              f"{np.median(decode_ms[label]):9.2f} {dec.describe():>26} "
              f"{pre.describe():>26}")
    print("top-1/KL B: on the held-out prompt; top-1 A: on the calibration prompt (activation "
          "ranking saw it); speedup = time(original) / time(pruned), median of paired runs "
          "[95 % interval]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
