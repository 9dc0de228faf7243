"""The scan's measurements, each in a child process and cached as soon as it is made: the
prompt's logits under a recipe (``measure_accuracy``, also split over two processes) and the
decode step's time under recipes against the original, in alternation (``measure_speed``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from opstudio.core.errors import ContractBroken, OpstudioError
from opstudio.core.model.runtime import create_session, session_options
from opstudio.core.plan.llm.judge import JUDGED, held_out, judged, logits_name
from opstudio.core.progress import CancelCheck, Progress

if TYPE_CHECKING:
    from opstudio.core.plan.scan_executor import RayScan


def apply_recipe(model: onnx.ModelProto, recipe_json: Mapping[str, Any],
                 samples: Sequence[Mapping[str, np.ndarray]]) -> onnx.ModelProto:
    """The passes of a recipe applied in turn, without the optimizer's validity check: for the
    scan's many throwaway rewrites (the final plan goes through ``optimize``)."""
    from opstudio.core.passes import PassContext, get_pass
    from opstudio.core.plan.recipe import Recipe

    current, owned = model, False
    for step in Recipe.from_json(recipe_json).steps:
        pass_ = get_pass(step.technique)
        ctx = PassContext(inputs=list(samples), owns_model=owned)
        if hasattr(ctx, "check_validity"):
            ctx.check_validity = False  # a throwaway rewrite: onnxruntime runs it next anyway
        result = pass_.apply(current, list(step.nodes or []), pass_.validate_params(step.params),
                             ctx)
        current, owned = result.model, True
    return current


def _session(model: onnx.ModelProto | str, threads: int, opt_level: str = "disable") -> Any:
    # the scan compares like with like: graph optimizations change neither side's numerics
    # noticeably and cost seconds per session on a 7000-node decoder
    opts = session_options(threads=threads,
                           opt_level="disable" if opt_level == "disable" else "all")
    return create_session(model, opts)



def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path | None, data: Mapping[str, Any]) -> None:
    if path is None:
        return
    from opstudio.core.fileio import write_text_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data), overwrite=True)
    except OSError:
        pass


def _pending(cache: str | None, kind: str, tasks: Sequence[tuple[str, Mapping[str, Any]]]
             ) -> tuple[Path | None, dict[str, Any], dict[str, Any], list[tuple[str, Any]]]:
    """The cache file, its contents, its ``kind`` section and the tasks not in it yet."""
    path = Path(cache) if cache else None
    store = _read_cache(path)
    done: dict[str, Any] = store.setdefault(kind, {})
    return path, store, done, [(i, r) for i, r in tasks if i not in done]


def _reference_logits(model: onnx.ModelProto, session: Any,
                      feeds: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """The name of the model's logits output and its value on ``feeds``."""
    names = [o.name for o in session.get_outputs()]
    first = dict(zip(names, session.run(None, dict(feeds))))
    name = logits_name(model, first)
    return name, first[name]


class Judge:
    """The model loaded once with its logits on the prompt; called with a recipe, the
    rewrite's top-1 agreement and KL against them (or why it failed). What a scan job does,
    in a child process here or on a cluster's worker (``scan_executor``)."""

    def __init__(self, model_path: str, prompt: Mapping[str, np.ndarray], threads: int = 0,
                 opt_level: str = "disable") -> None:
        from opstudio.core.model.model_io import load_model

        self.model = load_model(model_path)
        self.prompt, self.threads, self.opt_level = prompt, threads, opt_level
        self.name, self.reference = _reference_logits(
            self.model, _session(self.model, threads, opt_level), prompt)
        self.split = held_out(prompt)

    def __call__(self, recipe_json: Mapping[str, Any]) -> dict[str, Any]:
        try:
            rewritten = apply_recipe(self.model, recipe_json, [self.split.calibration])
            sess = _session(rewritten, self.threads, self.opt_level)
            logits = sess.run([self.name], fitted(sess, self.prompt))[0]
            return judged(self.reference, logits, self.split)
        except (OpstudioError, ContractBroken) as exc:
            return {"error": str(exc)}
        except Exception as exc:  # a pass or onnxruntime refusing a combination
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def measure_accuracy(model_path: str, prompt: Mapping[str, np.ndarray],
                     tasks: Sequence[tuple[str, Mapping[str, Any]]], cache: str | None,
                     threads: int = 0, opt_level: str = "disable",
                     progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Runs in a child: top-1 agreement and KL of the prompt's logits for each ``(id,
    recipe)``, the model loaded once; each result is written to ``cache`` as it comes."""
    path, store, done, todo = _pending(cache, "accuracy", tasks)
    if todo:
        judge = Judge(model_path, prompt, threads, opt_level)
        for index, (task_id, recipe_json) in enumerate(todo):
            if progress is not None:
                progress(index / len(todo), f"accuracy: {task_id}")
            done[task_id] = judge(recipe_json)
            store["accuracy"] = done
            _write_cache(path, store)
    return {i: done[i] for i, _ in tasks if i in done}


def _merge_parts(cache: str | None) -> dict[str, Any]:
    """The cached accuracy results, with those of parallel workers (``<cache>.partN``, left
    behind by an interrupted run too) merged in and their files removed."""
    if cache is None:
        return {}
    main = Path(cache)
    store = _read_cache(main)
    done = store.setdefault("accuracy", {})
    parts = sorted(main.parent.glob(main.name + ".part*"))
    for piece in parts:
        done.update(_read_cache(piece).get("accuracy", {}))
    if parts:
        _write_cache(main, store)
        for piece in parts:
            piece.unlink(missing_ok=True)
    return done


def accuracy_in_parallel(model_path: str, prompt: Mapping[str, np.ndarray],
                         tasks: Sequence[tuple[str, Mapping[str, Any]]], cache: str | None,
                         threads: int = 0, workers: int = 2, timeout: float | None = None,
                         cancelled: CancelCheck | None = None,
                         progress: Progress | None = None,
                         cluster: RayScan | None = None) -> dict[str, dict[str, Any]]:
    """``measure_accuracy`` split over ``workers`` child processes: most of a rewrite's time is
    the pass's single-threaded Python, so two of them keep two cores busy. Each writes its own
    part of the cache; the parts are merged when they are done (or on the next run). With a
    ``cluster``, the jobs run on its workers instead, each result cached as it arrives."""
    from concurrent.futures import ThreadPoolExecutor

    from opstudio.core.isolation import call_isolated

    done = _merge_parts(cache)
    if cluster is not None:
        path, store, done, todo = _pending(cache, "accuracy", tasks)

        def keep(task_id: str, result: dict[str, Any]) -> None:
            done[task_id] = result
            _write_cache(path, store)

        cluster.run(Judge, (cluster.model_path, prompt, 1), todo, keep, timeout=timeout,
                    cancelled=cancelled, progress=progress, task="judging")
        return {i: done[i] for i, _ in tasks if i in done}
    todo = [(i, r) for i, r in tasks if i not in done]
    workers = max(1, min(workers, len(todo)))
    if todo:
        shares = [todo[w::workers] for w in range(workers)]
        fractions = [0.0] * workers

        def run(w: int) -> dict[str, dict[str, Any]]:
            def report(f: float, m: str) -> None:
                fractions[w] = f
                if progress is not None:
                    progress(sum(fractions) / workers, m)

            part = None if cache is None else f"{cache}.part{w}"
            return call_isolated(measure_accuracy, model_path, prompt, shares[w], part,
                                 threads if workers == 1 else max(1, threads // workers),
                                 timeout=timeout, cancelled=cancelled, progress=report,
                                 task="measuring accuracy")

        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, range(workers)))
        for r in results:
            done.update(r)
        merged = _merge_parts(cache)
        done.update(merged)
    return {i: done[i] for i, _ in tasks if i in done}


def build_and_judge(model_path: str, prompt: Mapping[str, np.ndarray],
                    tasks: Sequence[tuple[str, Mapping[str, Any]]], folder: str,
                    threads: int = 0, progress: Progress | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Runs in a child: each recipe applied, judged on the prompt and saved in ``folder``,
    for ``measure_speed`` to time (models are built side by side, timed together)."""
    from opstudio.core.model.model_io import load_model, save_model

    model = load_model(model_path)
    name, reference = _reference_logits(model, _session(model, threads), prompt)
    split = held_out(prompt)
    out: dict[str, dict[str, Any]] = {}
    for index, (task_id, recipe_json) in enumerate(tasks):
        if progress is not None:
            progress(index / len(tasks), f"building {task_id}")
        try:
            rewritten = apply_recipe(model, recipe_json, [split.calibration])
            sess = _session(rewritten, threads)
            result = judged(reference, sess.run([name], fitted(sess, prompt))[0], split)
            target = Path(folder) / f"{hashlib.sha1(task_id.encode()).hexdigest()[:16]}.onnx"
            save_model(rewritten, target, overwrite=True)
            out[task_id] = {"path": str(target), **result}
        except Exception as exc:  # reported per task
            out[task_id] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


def speed_in_parallel(model_path: str, timed: Mapping[str, np.ndarray],
                      prompt: Mapping[str, np.ndarray],
                      tasks: Sequence[tuple[str, Mapping[str, Any]]], cache: str | None,
                      threads: int = 0, time_budget_s: float = 8.0, workers: int = 2,
                      timeout: float | None = None, cancelled: CancelCheck | None = None,
                      progress: Progress | None = None,
                      cluster: RayScan | None = None) -> dict[str, dict[str, Any]]:
    """The whole-model variants built and judged by ``workers`` processes side by side
    (``build_and_judge``), then timed together in one (``measure_speed``). With a
    ``cluster``, its workers judge them and they are built again here to be timed: latency
    is this machine's."""
    from concurrent.futures import ThreadPoolExecutor

    from opstudio.core.isolation import call_isolated
    from opstudio.core.tempdir import opstudio_tempdir

    done = _read_cache(Path(cache)).get("speed", {}) if cache else {}
    todo = [(i, r) for i, r in tasks if i not in done]
    if not todo:
        return {i: done[i] for i, _ in tasks if i in done}
    if cluster is not None:
        judged_there = accuracy_in_parallel(
            model_path, prompt, todo, cache, threads, timeout=timeout, cancelled=cancelled,
            progress=None if progress is None else lambda f, m: progress(0.5 * f, m),
            cluster=cluster)
        return call_isolated(measure_speed, model_path, timed, [held_out(prompt).calibration],
                             tasks, cache, threads, time_budget_s, None, judged_there,
                             timeout=timeout, cancelled=cancelled,
                             progress=(None if progress is None else
                                       lambda f, m: progress(0.5 + 0.5 * f, m)),
                             task="timing the variants")
    workers = max(1, min(workers, len(todo)))
    fractions = [0.0] * workers
    with opstudio_tempdir(prefix="variants-") as folder:
        def run(w: int) -> dict[str, dict[str, Any]]:
            def report(f: float, m: str) -> None:
                fractions[w] = f
                if progress is not None:
                    progress(0.7 * sum(fractions) / workers, m)

            return call_isolated(build_and_judge, model_path, prompt, todo[w::workers],
                                 str(folder), threads if workers == 1 else 1,
                                 timeout=timeout, cancelled=cancelled, progress=report,
                                 task="building the variants")

        with ThreadPoolExecutor(max_workers=workers) as pool:
            built: dict[str, dict[str, Any]] = {}
            for r in pool.map(run, range(workers)):
                built.update(r)
        return call_isolated(measure_speed, model_path, timed, [], tasks, cache, threads,
                             time_budget_s, None, built, timeout=timeout, cancelled=cancelled,
                             progress=(None if progress is None else
                                       lambda f, m: progress(0.7 + 0.3 * f, m)),
                             task="timing the variants")


def measure_speed(model_path: str, decode: Mapping[str, np.ndarray],
                  samples: Sequence[Mapping[str, np.ndarray]],
                  tasks: Sequence[tuple[str, Mapping[str, Any]]], cache: str | None,
                  threads: int = 0, time_budget_s: float = 8.0,
                  judge: Mapping[str, np.ndarray] | None = None,
                  prebuilt: Mapping[str, Mapping[str, Any]] | None = None,
                  progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Runs in a child: each recipe's model against the original, all timed in alternation
    on ``decode`` (ratios of paired runs with their interval), and the original's median ms;
    with ``judge`` (the prompt) also each model's top-1 agreement and KL on it, so a model
    built once is both timed and judged. ``prebuilt``: task -> ``build_and_judge``'s result,
    models judged (and built, when they name a ``path``) beforehand by other processes."""
    from opstudio.core.measure.timing import interleaved_times, paired_ratio, session
    from opstudio.core.model.model_io import load_model

    path, store, done, todo = _pending(cache, "speed", tasks)
    if todo:
        model = load_model(model_path)
        sessions = {"": session(model, threads)}
        errors: dict[str, dict[str, Any]] = {}
        name: str | None = None
        reference: np.ndarray | None = None
        split = held_out(judge) if judge is not None else None
        if judge is not None and not prebuilt:
            name, reference = _reference_logits(model, sessions[""], judge)
        for index, (task_id, recipe_json) in enumerate(todo):
            if progress is not None:
                progress(0.8 * index / len(todo), f"building {task_id}")
            try:
                built = (prebuilt or {}).get(task_id)
                if built is not None and "error" in built:
                    raise OpstudioError(built["error"])
                # judged elsewhere, and maybe built only there (on a cluster's worker)
                sessions[task_id] = FittedSession.of(session(
                    built["path"] if built is not None and "path" in built
                    else apply_recipe(model, recipe_json, samples), threads))
                if built is not None:
                    errors[task_id] = {k: built[k] for k in JUDGED if k in built}
                    continue
                if reference is not None and judge is not None:
                    errors[task_id] = judged(
                        reference, sessions[task_id].run([name], dict(judge))[0], split)
            except Exception as exc:  # reported per task
                done[task_id] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                sessions.pop(task_id, None)
        if progress is not None:
            progress(0.8, f"timing {len(sessions) - 1} variant(s) against the original")
        times = interleaved_times(sessions, dict(decode), rounds=400, min_rounds=12,
                                  time_budget_s=time_budget_s * max(1, len(sessions) - 1))
        base = times[""]
        timed_ids = [t for t in sessions if t]
        for task_id in timed_ids:
            r = paired_ratio(times[task_id], base)
            # with a few variants, each against each other too: a choice between two of
            # them then rests on their own paired rounds, not on two ratios to a third
            versus = {} if len(timed_ids) > 3 else {
                other: _triple(paired_ratio(times[task_id], times[other]))
                for other in timed_ids if other != task_id}
            done[task_id] = {"ratio": r.median, "low": r.low, "high": r.high,
                             "rounds": r.rounds, "base_ms": float(np.median(base)),
                             "shapes": {k: list(np.shape(v)) for k, v in decode.items()},
                             **({"versus": versus} if versus else {}),
                             **errors.get(task_id, {})}
        store["speed"] = done
        _write_cache(path, store)
    return {i: done[i] for i, _ in tasks if i in done}


def _triple(r: Any) -> list[float]:
    return [r.median, r.low, r.high]


def fitted(sess: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` as ``sess`` takes them: a float past becomes a quantized KV cache's type."""
    from opstudio.core.measure.profiler import check_feeds

    return check_feeds(sess, feeds) if FittedSession.quantized(sess) else dict(feeds)


class FittedSession:
    """A session with a quantized KV cache, fed the float past the others are (converted once
    per feed, outside the timed run)."""

    def __init__(self, sess: Any) -> None:
        self.sess = sess
        # the feed last converted (held, so that its arrays' ids stay theirs) and its conversion
        self._last: tuple[list[Any], dict[str, np.ndarray]] | None = None

    @staticmethod
    def quantized(sess: Any) -> bool:
        return any(i.type in ("tensor(int8)", "tensor(uint8)") and len(i.shape or ()) >= 4
                   for i in sess.get_inputs())

    @classmethod
    def of(cls, sess: Any) -> Any:
        return cls(sess) if cls.quantized(sess) else sess

    def get_outputs(self) -> Any:
        return self.sess.get_outputs()

    def get_inputs(self) -> Any:
        return self.sess.get_inputs()

    def run(self, outputs: Any, feeds: Mapping[str, np.ndarray]) -> Any:
        values = list(feeds.values())
        if self._last is None or len(self._last[0]) != len(values) \
                or any(a is not b for a, b in zip(self._last[0], values)):
            self._last = (values, fitted(self.sess, feeds))
        return self.sess.run(outputs, self._last[1])
