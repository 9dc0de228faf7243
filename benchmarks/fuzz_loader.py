"""Long fuzz run of the loader and the analysis behind ``opstudio inspect``.

    python benchmarks/fuzz_loader.py [--seconds 300] [--cases 20000] [--seed 1] [SEED_MODEL ...]

Seed models default to the demo models plus every .onnx under /work/models smaller than
``--max-seed-mb``. Each case mutates one seed, either as bytes (flip, truncate, insert, delete,
splice) or as a parsed protobuf (a random field of a random message set to a hostile value:
negative or huge dims, wrong data types, dangling names, ``../`` external-data locations…),
writes it to a temp file and runs ``load_model`` + ``analyze`` on it. A case passes when it ends
in a result or an ``OpstudioError``; anything else (another exception, a crash of the worker
process, a case over ``--case-timeout`` seconds) is a failure, printed with the seed and case
number that reproduce it. Cases run in a child process so a crash in native code is caught too.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import tempfile
import time
import traceback
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEEDS = [ROOT / "resources" / "article_cnn.onnx", ROOT / "resources" / "tiny_llm.onnx"]
HOSTILE_INTS = [0, 1, -1, 2, 3, 7, 64, 1 << 16, 1 << 31, (1 << 31) - 1, -(1 << 31), 1 << 40,
                (1 << 62), (1 << 63) - 1, -(1 << 63)]
HOSTILE_STRINGS = ["", "x", "../x.bin", "/etc/passwd", "a/../../b", "com.microsoft", "ai.onnx",
                   "Constant", "If", "Loop", "MatMul", "Conv", "Reshape", "\x00", "é" * 3]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 4, 16])):
        if not buf:
            break
        kind = rng.randrange(5)
        pos = rng.randrange(len(buf))
        if kind == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[pos] = rng.randrange(256)
        elif kind == 2:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 3:
            del buf[pos:pos + rng.randint(1, 64)]
        else:  # splice a chunk from elsewhere in the file (keeps protobuf-like structure)
            src = rng.randrange(len(buf))
            buf[pos:pos] = buf[src:src + rng.randint(1, 256)]
    if rng.random() < 0.1:
        del buf[rng.randrange(len(buf) + 1):]
    return bytes(buf)


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6; older ones only have .label
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def _messages(msg, out: list) -> None:
    out.append(msg)
    for field, value in msg.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if _repeated(field):
            items = list(value)
            # cap the walk on big repeated fields so huge models stay cheap
            for item in items if len(items) < 200 else random.sample(items, 200):
                _messages(item, out)
        else:
            _messages(value, out)


def mutate_proto(model: onnx.ModelProto, rng: random.Random) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for _ in range(rng.choice([1, 1, 2, 3])):
        msgs: list = []
        _messages(m, msgs)
        msg = rng.choice(msgs)
        fields = msg.DESCRIPTOR.fields
        if not fields:
            continue
        f = rng.choice(fields)
        repeated = _repeated(f)
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                container = getattr(msg, f.name)
                if len(container) and rng.random() < 0.5:
                    del container[rng.randrange(len(container))]
                elif len(container):
                    container.add().CopyFrom(container[rng.randrange(len(container))])
                else:
                    container.add()
            else:
                msg.ClearField(f.name)
            continue
        if f.type in (FieldDescriptor.TYPE_STRING,):
            value = rng.choice(HOSTILE_STRINGS + [s for s in _names(m, rng)])
        elif f.type == FieldDescriptor.TYPE_BYTES:
            value = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 8, 64])))
        elif f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            value = rng.choice([0.0, -1.0, 1e30, float("nan"), float("inf")])
        elif f.type == FieldDescriptor.TYPE_BOOL:
            value = rng.random() < 0.5
        else:
            value = rng.choice(HOSTILE_INTS)
            if f.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_UINT32):
                value = abs(value) % (1 << 32 if f.type == FieldDescriptor.TYPE_UINT32 else 1 << 64)
            elif f.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM):
                value = max(-(1 << 31), min((1 << 31) - 1, value))
        try:
            if repeated:
                container = getattr(msg, f.name)
                if len(container) and rng.random() < 0.6:
                    container[rng.randrange(len(container))] = value
                else:
                    container.append(value)
            else:
                setattr(msg, f.name, value)
        except (TypeError, ValueError):
            continue
    return m.SerializeToString()


def _names(m: onnx.ModelProto, rng: random.Random) -> list[str]:
    nodes = m.graph.node
    if not nodes:
        return []
    n = nodes[rng.randrange(len(nodes))]
    return [x for x in list(n.input) + list(n.output) + [n.name] if x][:4]


def run_case(path: str) -> None:
    from opstudio.core.model.graph import analyze
    from opstudio.core.model.model_io import load_model

    model = load_model(path)
    analyze(model)


def make_case(datas: list[bytes], models: list[onnx.ModelProto], seed: int, case: int) -> bytes:
    rng = random.Random(seed * 1_000_003 + case)
    k = rng.randrange(len(datas))
    try:
        return mutate_bytes(datas[k], rng) if rng.random() < 0.5 else mutate_proto(models[k], rng)
    except Exception:  # a mutation protobuf refuses to serialise: mutate the bytes instead
        return mutate_bytes(datas[k], rng)


def worker(conn, seeds: list[str], seed: int, tmp: str) -> None:
    """Runs cases on request; answers (case id, outcome, detail)."""
    from opstudio.core.errors import OpstudioError

    datas = [Path(s).read_bytes() for s in seeds]
    models = [onnx.load_model_from_string(d) for d in datas]
    while True:
        case = conn.recv()
        if case is None:
            break
        data = make_case(datas, models, seed, case)
        p = Path(tmp) / "case.onnx"
        p.write_bytes(data)
        try:
            run_case(str(p))
            conn.send((case, "ok", ""))
        except OpstudioError as exc:
            conn.send((case, "error", str(exc).splitlines()[0] if str(exc) else ""))
        except Exception as exc:
            tb = traceback.format_exc().strip().splitlines()
            conn.send((case, "FAIL", f"{type(exc).__name__}: {exc} | {' / '.join(tb[-4:])}"[:600]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seeds", nargs="*")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--case-timeout", type=float, default=90)
    parser.add_argument("--max-seed-mb", type=float, default=3.0)
    parser.add_argument("--models", default="/work/models")
    parser.add_argument("--write-case", type=int, metavar="N",
                        help="only write case N (with --seed) to fuzz_case.onnx to reproduce it")
    args = parser.parse_args(argv)

    seeds = [Path(s) for s in args.seeds] or [
        *DEFAULT_SEEDS,
        *sorted(p for p in Path(args.models).rglob("*.onnx")
                if p.stat().st_size <= args.max_seed_mb * 1e6
                and not any(x.key == "location" for t in
                            onnx.load(str(p), load_external_data=False).graph.initializer
                            for x in t.external_data))]
    if args.write_case is not None:
        datas = [s.read_bytes() for s in seeds]
        models = [onnx.load_model_from_string(d) for d in datas]
        Path("fuzz_case.onnx").write_bytes(make_case(datas, models, args.seed, args.write_case))
        print("wrote fuzz_case.onnx")
        return 0
    print(f"seeds: {len(seeds)} models; budget {args.cases} cases / {args.seconds:.0f} s")
    ctx = mp.get_context("spawn")
    counts = {"ok": 0, "error": 0, "FAIL": 0, "crash": 0, "timeout": 0}
    failures: list[str] = []
    start = time.monotonic()
    case = 0

    def spawn():
        parent, child = ctx.Pipe()
        # not a daemon: like the CLI's own process, it may start the isolated children that
        # analyze() runs onnx's shape inference in
        proc = ctx.Process(target=worker, daemon=False,
                           args=(child, [str(s) for s in seeds], args.seed, scratch.name))
        proc.start()
        return proc, parent

    scratch = tempfile.TemporaryDirectory(prefix="opstudio-fuzz-")
    proc, conn = spawn()
    while case < args.cases and time.monotonic() - start < args.seconds:
        conn.send(case)
        if conn.poll(args.case_timeout):
            try:
                _, outcome, detail = conn.recv()
            except EOFError:
                outcome, detail = "crash", f"worker died (exit {proc.exitcode})"
        else:
            outcome, detail = "timeout", f"over {args.case_timeout:.0f} s"
        if outcome in ("crash", "timeout") or not proc.is_alive():
            proc.kill()
            proc.join()
            outcome = outcome if outcome in ("crash", "timeout", "FAIL") else "crash"
            proc, conn = spawn()
        counts[outcome] += 1
        if outcome not in ("ok", "error"):
            failures.append(f"case {case} (--seed {args.seed}): {outcome}: {detail}")
            print(failures[-1], flush=True)
        case += 1
    conn.send(None)
    proc.join(timeout=10)
    scratch.cleanup()
    elapsed = time.monotonic() - start
    print(f"cases tried: {case} in {elapsed:.0f} s ({case / elapsed:.1f}/s); "
          f"valid results: {counts['ok']}, clear errors: {counts['error']}, "
          f"failures: {counts['FAIL']} exceptions, {counts['crash']} crashes, "
          f"{counts['timeout']} timeouts")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
