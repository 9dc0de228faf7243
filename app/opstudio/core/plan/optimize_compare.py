"""Optimize & compare, what the app's button and ``opstudio optimize --compare`` run: apply a
recipe, then compare the result with the original on the same inputs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from opstudio.core.errors import Cancelled, OpstudioError
from opstudio.core.isolation import call_isolated
from opstudio.core.measure.compare import Comparison, NotCompared, compare_models
from opstudio.core.measure.inputs import NeedsInputs, make_inputs
from opstudio.core.measure.profiler import ProfileSettings
from opstudio.core.measure.text_prompt import judging
from opstudio.core.progress import CancelCheck, Progress
from opstudio.core.tempdir import opstudio_tempdir


def optimize_and_compare(model: onnx.ModelProto, recipe: Any, settings: ProfileSettings, *,
                         model_path: str | Path | None = None,
                         progress: Progress | None = None,
                         cancelled: CancelCheck | None = None
                         ) -> tuple[Any, Comparison | NotCompared]:
    """Apply ``recipe`` to ``model``, then compare the two: what the GUI's "Optimize & compare"
    runs. The inputs are made once and serve as the comparison's timing inputs; calibration
    and accuracy use the same tensors, or the text prompt when a tokenizer is beside
    ``model_path`` (or named in the settings) and no inputs file is given. When the inputs
    cannot be made, the model is optimized all the same (a technique that calibrates refuses)
    and not compared."""
    from opstudio.core.plan.optimize import optimize

    def part(lo: float, hi: float) -> Progress | None:
        if progress is None:
            return None
        return lambda f, m: progress(lo + (hi - lo) * max(0.0, min(1.0, f)), m)

    try:
        inputs = make_inputs(model, dims=settings.dims, shapes=settings.shapes,
                             npz_path=settings.inputs_path, seed=settings.seed,
                             phase=settings.phase, past=settings.past, model_path=model_path)
    except NeedsInputs as exc:
        result = optimize(model, recipe, progress=part(0.0, 1.0), cancelled=cancelled)
        return result, NotCompared(exc.why)
    judge = judging(model, model_path, settings)
    result = optimize(model, recipe, inputs=judge.feed if judge.feed is not None else inputs,
                      progress=part(0.0, 0.25), cancelled=cancelled)
    try:
        comparison: Comparison | NotCompared = compare_models(
            model, result.model, settings, inputs=inputs, judge=judge,
            progress=part(0.25, 1.0), cancelled=cancelled)
    except Cancelled:
        raise
    except OpstudioError:
        why = _original_fails(model, inputs, settings, cancelled)
        if why is None:  # the original runs: the failure is the result's, say so
            raise
        comparison = NotCompared(why)
    return result, comparison


def _original_fails(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
                    settings: ProfileSettings, cancelled: CancelCheck | None) -> str | None:
    """Why the original model does not run on ``inputs`` (in a child process), or None."""
    from opstudio.core.measure.accuracy import run_outputs
    from opstudio.core.model.model_io import save_model

    with opstudio_tempdir() as tmp:
        path = Path(tmp) / "original.onnx"
        save_model(model, path, overwrite=True)
        try:
            call_isolated(run_outputs, str(path), dict(inputs), timeout=settings.timeout_s,
                          cancelled=cancelled)
        except Cancelled:
            raise
        except OpstudioError as exc:
            return f"the original model does not run on these inputs ({exc})"
    return None
