"""Operator fusion (``fuse``) on a trained HF-layout decoder: unfused vs fused fp32 decode.

The model is SmolLM2-135M-Instruct as optimum exports it (real weights, fp16 storage behind
Casts, 30 layers), in ``~/.cache/opstudio-bench/llm/trained_hf/`` with ``prompt_b.npz`` beside
it. ``fuse`` is applied to every layer's norms, rotary embeddings, attention (q|k|v packed) and
SiLU MLP (gate|up packed) (the recipe below, as ``opstudio optimize`` applies it), then both
models are profiled at one decode step after a past of ``--past`` tokens, their rounds taking
turns in one child process (``core.measure.compare.compare_models``, as ``opstudio compare A B --phase
decode --past 512``): the ratios are medians of per-round ratios with their 95 % bootstrap
intervals. Printed: the step's time, the kernels onnxruntime runs per step (after its own graph optimizations), the rows whose
change is significant, and next-token agreement on every position of ``prompt_b.npz``. With
``--int4``, whole-model INT4 (``int4-weight`` on every MatMul, defaults) of the unfused model
against the same INT4 of the fused one, and of the model fused without packing the projections
(``pack`` false) against the packed one, each pair timed the same way.

With ``--anchor``, the same weights as onnxruntime-genai's builder exports them (fp32 and INT4,
``llm_exports.py trained genai fp32|int4``, in ``~/.cache/opstudio-bench/llm/trained_genai/``)
are timed in one interleaved run (``core.measure.profiler.profile_models``, on the decode feeds made for
the HF export; the genai export reads the inputs it has) with: unfused fp32; fused fp32; fused +
INT4; fused + INT8 weight-only; fused + INT4 + ``kv-cache`` int8 (scales calibrated on
``prompt_b.npz``); the same with INT4 in blocks of 64 (fewer scales: ``MatMulNBits`` is held by
its arithmetic on a few cores, not by memory). Each row has its median
step with a 95 % interval and its memory limit: the bytes a step reads (weights as onnxruntime
holds them, fp16 behind a Cast counted as fp32, embedding tables read only by a Gather not
counted, plus the KV cache at the past in the row's cache type) over this machine's bandwidth
(``core.measure.roofline``), and where its step goes (weight MatMuls, attention, other kernels,
between kernels). Each table is printed twice (``--kv-buffer both``): with every KV cache fed as
separate arrays, as optimum runs an export, and with a ``GroupQueryAttention``'s cache in one
buffer with its past, as onnxruntime-genai runs its models (``core.measure.kv_buffer``; the
unfused export's Concat presents cannot share and stay separate).

    python benchmarks/bench_fusion.py [--model PATH] [--past 512] [--runs 40] [--out DIR] [--int4]
                                      [--anchor] [--genai DIR] [--bandwidth GBS]
                                      [--kv-buffer copy|shared|both]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from opstudio.core.measure.accuracy import evaluate
from opstudio.core.measure.compare import compare_models, interval_text
from opstudio.core.measure.profiler import Profile, ProfileSettings, profile_models
from opstudio.core.measure.roofline import measure_machine
from opstudio.core.measure.timing import Ratio, median_interval, paired_speedup, quiet_rounds
from opstudio.core.model.model_io import load_model
from opstudio.core.model.tensors import tensor_nbytes
from opstudio.core.plan.optimize import optimize_file
from opstudio.core.plan.recipe import Recipe

FUSE_ALL = {"version": 1, "steps": [{"op_types": ["Pow", "Neg", "Sigmoid"], "technique": "fuse"}]}
UNPACKED = {"version": 1, "steps": [{"op_types": ["Pow", "Neg"], "technique": "fuse",
                                     "params": {"pack": False}}]}
INT4_ALL = {"version": 1, "steps": [{"op_types": ["MatMul"], "technique": "int4-weight"}]}
INT4_B64 = {"version": 1, "steps": [{"op_types": ["MatMul"], "technique": "int4-weight",
                                     "params": {"block_size": 64}}]}
INT8_ALL = {"version": 1, "steps": [{"op_types": ["MatMul"], "technique": "int8-weight"}]}
KV8_ALL = {"version": 1, "steps": [{"op_types": ["GroupQueryAttention"], "technique": "kv-cache",
                                    "params": {"bits": 8}}]}
DEFAULT_MODEL = Path.home() / ".cache/opstudio-bench/llm/trained_hf/model.onnx"
DEFAULT_GENAI = Path.home() / ".cache/opstudio-bench/llm/trained_genai"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--past", type=int, default=512)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("/tmp/opstudio-bench-fusion"))
    parser.add_argument("--int4", action="store_true",
                        help="also compare whole-model INT4 unfused against fused")
    parser.add_argument("--anchor", action="store_true",
                        help="time unfused, fused, both INT4s and the genai builder's fp32 and "
                             "INT4 exports together, with each one's memory limit")
    parser.add_argument("--genai", type=Path, default=DEFAULT_GENAI,
                        help="folder with the genai builder's fp32/ and int4/ exports")
    parser.add_argument("--kv-buffer", choices=("copy", "shared", "both"), default="both",
                        help="how a GroupQueryAttention's cache is fed (core.measure.kv_buffer): "
                             "separate arrays, one buffer with its past as onnxruntime-genai "
                             "runs it, or each table both ways (default)")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="memory bandwidth in GB/s for the memory limit (default: "
                             "core.measure.roofline's cached measurement, which a busy machine lowers)")
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"{args.model}: not found (the trained HF-style export)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    fused = args.out / "fused.onnx"
    start = time.perf_counter()
    result = optimize_file(args.model, Recipe.from_json(FUSE_ALL), fused, overwrite=True)
    print(f"fuse: {time.perf_counter() - start:.1f} s; {'; '.join(result.steps[0].notes)}")

    modes = ("copy", "shared") if args.kv_buffer == "both" else (args.kv_buffer,)
    settings = {mode: ProfileSettings(runs=args.runs, phase="decode", past=args.past,
                                      kv_buffer=mode) for mode in modes}
    for mode in modes:
        fused_vs_unfused(args.model, fused, settings[mode])

    prompt = args.model.parent / "prompt_b.npz"
    feeds: dict[str, np.ndarray] = {}
    if prompt.exists():
        with np.load(prompt) as data:
            feeds = {k: data[k] for k in data.files}
        report = evaluate(str(args.model), str(fused), feeds, threads=0)
        print(f"\non {prompt.name} ({feeds['input_ids'].shape[1]} tokens): {report.summary()}; "
              f"logits cosine ≥ {report.worst_cosine():.6f}")
    if args.int4 or args.anchor:
        int4 = [args.out / "int4.onnx", args.out / "fused_int4.onnx"]
        for source, target in zip((args.model, fused), int4, strict=True):
            optimize_file(source, Recipe.from_json(INT4_ALL), target, overwrite=True)
    if args.anchor:
        genai = [args.genai / "fp32" / "model.onnx", args.genai / "int4" / "model.onnx"]
        missing = [str(p) for p in genai if not p.exists()]
        if missing:
            print(f"{missing[0]}: not found (build it with benchmarks/llm_exports.py trained "
                  "genai fp32|int4)", file=sys.stderr)
            return 1
        anchor_rows = anchor_models(args, fused, int4[1], feeds, genai)
        for mode in modes:
            anchor_table(anchor_rows, settings[mode], args.bandwidth)
        if feeds:
            print(f"\nagainst unfused fp32 on {prompt.name} (every position):")
            for label, path in anchor_rows[1:-2]:  # the genai exports take other inputs
                report = evaluate(str(args.model), str(path), feeds, threads=0)
                print(f"  {label:17} {report.summary()}")
    if args.int4:
        unpacked = [args.out / "unpacked.onnx", args.out / "unpacked_int4.onnx"]
        optimize_file(args.model, Recipe.from_json(UNPACKED), unpacked[0], overwrite=True)
        optimize_file(unpacked[0], Recipe.from_json(INT4_ALL), unpacked[1], overwrite=True)
        for text, before, after in (("unfused → fused", int4[0], int4[1]),
                                    ("fused unpacked → packed", unpacked[1], int4[1])):
            pair = compare_models(before, after, settings[modes[-1]])
            print(f"\nINT4 (every MatMul) {text}: plain p50 "
                  f"{(pair.before.plain_ms or {}).get('p50', float('nan')):.2f} → "
                  f"{(pair.after.plain_ms or {}).get('p50', float('nan')):.2f} ms, "
                  f"{'n/a' if pair.plain_ratio is None else f'{pair.plain_ratio.median:.2f}×'}, "
                  f"{interval_text(pair.plain_ratio)}; {len(pair.before.kernel_events)} → "
                  f"{len(pair.after.kernel_events)} kernels; {pair.noise()}")
    return 0


KV_WORDS = {"copy": "fed as separate arrays (as optimum runs an export)",
            "shared": "of a GroupQueryAttention in one buffer with its past (as onnxruntime-genai "
                      "runs it; the unfused model's Concat presents stay separate)"}


def fused_vs_unfused(model: Path, fused: Path, settings: ProfileSettings) -> None:
    """The unfused and the fused model timed in turn, with the kernels each runs."""
    comparison = compare_models(model, fused, settings)
    kernels = {side: Counter(e["op"] for e in p.kernel_events)
               for side, p in (("unfused", comparison.before), ("fused", comparison.after))}
    print(f"\nKV cache {KV_WORDS[settings.kv_buffer]}")
    print(f"{comparison.step}, {comparison.before.runs} rounds, interleaved; "
          f"{comparison.noise()}")
    print(f"{'model':10} {'plain p50 ms':>12} {'profiled p50 ms':>15} {'kernels/step':>12}")
    for side, p in (("unfused", comparison.before), ("fused", comparison.after)):
        print(f"{side:10} {(p.plain_ms or {}).get('p50', float('nan')):12.2f} "
              f"{p.total_ms['p50']:15.2f} {sum(kernels[side].values()):12d}")
    for label, ratio in (("plain", comparison.plain_ratio), ("profiled", comparison.total_ratio)):
        median = "n/a" if ratio is None else f"{ratio.median:.2f}×"
        print(f"speed-up ({label} runs): {median}, {interval_text(ratio)}")
    print("\nkernels per step by op type (unfused → fused), where they differ:")
    for op in sorted(set(kernels["unfused"]) | set(kernels["fused"]),
                     key=lambda o: -kernels["unfused"][o]):
        if kernels["unfused"][op] != kernels["fused"][op]:
            print(f"  {op:36} {kernels['unfused'][op]:5d} → {kernels['fused'][op]:5d}")
    rows = [r for r in comparison.op_types() if r["ratio"] is not None and r["ratio"].significant]
    print("\nop types whose time changed significantly (ms per step, unfused → fused):")
    for r in rows[:12]:
        print(f"  {r['op_type']:36} {r['before_ms']:7.3f} → {r['after_ms']:7.3f}")


def anchor_models(args: argparse.Namespace, fused: Path, fused_int4: Path,
                  prompt: dict[str, np.ndarray], genai: list[Path]) -> list[tuple[str, Path]]:
    """The anchor table's rows, made from the trained export (genai's builder's last)."""
    made = {name: args.out / f"{name}.onnx"
            for name in ("fused_int8w", "fused_int4_kv8", "fused_int4b64", "fused_int4b64_kv8")}
    calibration = [prompt] if prompt else None
    optimize_file(fused, Recipe.from_json(INT8_ALL), made["fused_int8w"], overwrite=True)
    optimize_file(fused_int4, Recipe.from_json(KV8_ALL), made["fused_int4_kv8"], overwrite=True,
                  calibration=calibration)
    optimize_file(fused, Recipe.from_json(INT4_B64), made["fused_int4b64"], overwrite=True)
    optimize_file(made["fused_int4b64"], Recipe.from_json(KV8_ALL), made["fused_int4b64_kv8"],
                  overwrite=True, calibration=calibration)
    return [("unfused fp32", args.model), ("fused fp32", fused),
            ("fused INT4", fused_int4), ("fused INT8w", made["fused_int8w"]),
            ("fused INT4 KV8", made["fused_int4_kv8"]),
            ("fused INT4/64 KV8", made["fused_int4b64_kv8"]), ("genai fp32", genai[0]),
            ("genai INT4", genai[1])]


def cache_itemsize(path: Path) -> int:
    """Bytes of one KV cache element the model reads (int8 after ``kv-cache``, else float)."""
    model = load_model(path, load_external_data=False, name_nodes=False)
    for value in model.graph.input:
        if value.name.startswith("past_key_values"):
            dtype = value.type.tensor_type.elem_type
            return onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize
    return 4


def bytes_read(path: Path) -> int:
    """Weight bytes one decode step reads: initializers at the dtype onnxruntime holds them in
    (an fp16 initializer behind a Cast is folded to the Cast's type), leaving out tables read
    a row per token: only by a Gather's data input (an embedding) or as a fused rotary cache."""
    model = load_model(path, load_external_data=False, name_nodes=False)
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))

    # rotary caches: a fused attention reads the rows of the step's positions only
    rows = {"Gather": (0,), "GroupQueryAttention": (7, 8), "RotaryEmbedding": (2, 3)}

    def gathered(name: str) -> bool:
        uses = readers.get(name, [])
        return bool(uses) and all(
            i in rows.get(n.op_type, ()) or (n.op_type == "Cast" and gathered(n.output[0]))
            for n, i in uses)

    total = 0
    for tensor in model.graph.initializer:
        if gathered(tensor.name):
            continue
        n = tensor_nbytes(tensor)
        casts = [node for node, _ in readers.get(tensor.name, []) if node.op_type == "Cast"]
        if casts and tensor.data_type == onnx.TensorProto.FLOAT16:
            to = next(a.i for a in casts[0].attribute if a.name == "to")
            n = n // 2 * onnx.helper.tensor_dtype_to_np_dtype(to).itemsize
        total += n
    return total


def anchor_table(models: list[tuple[str, Path]], settings: ProfileSettings,
                 bandwidth_gbs: float | None = None) -> None:
    """All ``models`` timed in turn in one process; each row against the genai INT4 (last)."""
    bandwidth = bandwidth_gbs or measure_machine().bandwidth_gbs
    profiles = profile_models([p for _, p in models], settings)
    first = profiles[0]
    memory = first.memory
    kv = (memory.kv_token_bytes or 0) * (memory.past or 0) if memory else 0
    print(f"\nKV cache {KV_WORDS[settings.kv_buffer]}")
    print(f"anchor: {first.step}, {first.runs} rounds, all {len(models)} models interleaved "
          f"in one process; bandwidth {bandwidth:.1f} GB/s "
          f"({'given' if bandwidth_gbs else 'core.measure.roofline'}); "
          f"KV at the past {kv / 1e6:.1f} MB")
    print(f"{'model':17} {'p50 ms':>7} {'95 % interval':>15} {'kernels':>7} {'read MB':>8} "
          f"{'limit ms':>8} {'× limit':>7}  {'vs genai INT4 (speed-up, 95 %)':30}")
    anchor = profiles[-1]
    for (label, path), p in zip(models, profiles, strict=True):
        series = p.plain_series_ms or p.total_series_ms
        lo, hi = median_interval(series)
        median = float(np.median(series))
        read = bytes_read(path) + kv * cache_itemsize(path) // 4
        limit_ms = read / (bandwidth * 1e9) * 1e3
        ratio = against(anchor, p)
        vs = "—" if p is anchor else (
            "n/a" if ratio is None else f"{ratio.median:.2f}× [{ratio.low:.2f}, {ratio.high:.2f}]")
        print(f"{label:17} {median:7.2f} {f'[{lo:.2f}, {hi:.2f}]':>15} "
              f"{len(p.kernel_events):7d} {read / 1e6:8.1f} {limit_ms:8.2f} "
              f"{median / limit_ms:7.2f}  {vs}")
    breakdown_table(models, profiles, bandwidth, kv)
    index = {label: i for i, (label, _) in enumerate(models)}
    pairs = [("fused fp32", "unfused fp32"), ("fused fp32", "genai fp32"),
             ("fused INT4", "genai INT4"), ("fused INT4 KV8", "genai INT4")]
    for after, before in pairs:
        text = f"{after} vs {before}"
        ratio = against(profiles[index[before]], profiles[index[after]])
        print(f"{text}: {'n/a' if ratio is None else f'{ratio.median:.2f}×'}, "
              f"{interval_text(ratio)}")


WEIGHT_MATMULS = {"MatMul", "MatMulNBits", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul",
                  "MatMulIntegerToFloat", "QLinearMatMul"}


def weight_matmuls(path: Path) -> set[str]:
    """Names of the MatMul-family nodes that read a weight (an initializer, or one behind a
    Cast or DequantizeLinear): the attention's score and value MatMuls of an unfused model read
    activations and are left out."""
    model = load_model(path, load_external_data=False, name_nodes=False)
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Cast", "DequantizeLinear", "Transpose") and node.input[0] in constant:
            constant.update(node.output)
    return {n.name for n in model.graph.node
            if n.op_type in WEIGHT_MATMULS and any(i in constant for i in n.input[1:])}


def breakdown_table(models: list[tuple[str, Path]], profiles: list[Profile], bandwidth: float,
                    kv_bytes: int) -> None:
    """Where each row's step goes in its profiled run (per-node medians: the profiler's cost is
    per kernel, so scaling them to the plain step would shrink an unfused model's MatMuls with
    its two thousand small kernels' overhead), split into weight MatMuls, fused attention and
    the rest, each kind beside the time its bytes take at the measured bandwidth (weights for
    the MatMuls, the cache for the attention): a kind far above its bytes' time is held by its
    kernel's arithmetic or copies, not by memory."""
    print("\nwhere the step goes (ms of the profiled step, per-node medians; × = over the time "
          "its bytes take):")
    print(f"{'model':17} {'weight MatMuls':>18} {'attention':>16} {'other kernels':>13} "
          f"{'between':>8}")
    for (label, path), p in zip(models, profiles, strict=True):
        names = weight_matmuls(path)
        matmul = sum(n.p50_ms for n in p.nodes
                     if {n.name, *n.group, *n.kernels} & names)
        attention = sum(n.p50_ms for n in p.nodes if n.op_type == "GroupQueryAttention")
        other = sum(n.p50_ms for n in p.nodes) - matmul - attention
        weights_ms = (bytes_read(path)) / (bandwidth * 1e9) * 1e3
        cache_ms = kv_bytes * cache_itemsize(path) / 4 / (bandwidth * 1e9) * 1e3
        attn = (f"{attention:6.2f} ({attention / cache_ms:4.1f}×)"
                if attention else f"{'—':>16}")
        print(f"{label:17} {matmul:8.2f} ({matmul / weights_ms:4.1f}×)     "
              f"{attn:>16} {other:13.2f} {p.untraced_ms:8.2f}")


def against(before: Profile, after: Profile) -> Ratio | None:
    """Speed-up of ``after`` over ``before`` from their plain runs, paired round by round."""
    b, a = before.plain_series_ms, after.plain_series_ms
    if not b or not a:
        b, a = before.total_series_ms, after.total_series_ms
        return paired_speedup(b, a, quiet_rounds(b, a))
    return paired_speedup(b, a, quiet_rounds(b, a), (before.plain_sessions, after.plain_sessions))


if __name__ == "__main__":
    raise SystemExit(main())
