"""The app's document: the open model, what was measured on it, and the plan being built.

One plain object, free of Qt, holds the state the views show (as napari's ViewerModel does):
the model path and ``ModelProto`` (read lazily: its weights stay in their files until a check
or the optimizer reads them), its analysis (``GraphInfo`` and layout), the run settings,
the baseline profile and the machine's roofline ceilings, the optimized result and its
comparison, the advice, and the plan. Each change is announced by an ``Event``; the widgets
subscribe to these, and the window only wires them together. Results are replaced as a whole,
in the UI thread, when a worker hands them over.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from opstudio.core.errors import OpstudioError
from opstudio.core.measure.compare import Comparison, NotCompared
from opstudio.core.measure.profiler import NodeStats, Profile, ProfileSettings
from opstudio.core.measure.roofline import Machine
from opstudio.core.model.graph import GraphInfo
from opstudio.core.model.layout import Layout
from opstudio.core.model.model_io import save_model
from opstudio.core.plan import report
from opstudio.core.plan.advisor import Advice
from opstudio.core.plan.deploy import FolderExport, write_folder
from opstudio.core.plan.llm import LlmAdvice
from opstudio.core.plan.optimize import OptimizeResult
from opstudio.core.plan.recipe import Step
from opstudio.core.session.edits import Plan
from opstudio.core.session.events import Event
from opstudio.core.session.opening import Opened

AnyAdvice = Advice | LlmAdvice  # per operator, or per layer and role of a language model


class Document:
    """What is open and what was measured; every setter announces itself after the change."""

    def __init__(self, settings: ProfileSettings | None = None) -> None:
        self.settings = settings or ProfileSettings()
        self.model_path: Path | None = None
        self.model: onnx.ModelProto | None = None
        self.graph: GraphInfo | None = None
        self.layout: Layout | None = None
        self.profile: Profile | None = None
        self.machine: Machine | None = None  # this machine's ceilings, once measured
        self.optimized: OptimizeResult | None = None
        self.comparison: Comparison | None = None
        self.advice: AnyAdvice | None = None
        self.plan = Plan()
        self.opened: Event[[Opened]] = Event()
        self.profiled: Event[[Profile]] = Event()
        self.compared: Event[[Comparison]] = Event()
        self.not_compared: Event[[NotCompared]] = Event()
        self.advised: Event[[AnyAdvice]] = Event()

    # --- state changes ------------------------------------------------------------------------
    def open(self, opened: Opened, plan: list[Step] | None = None) -> None:
        """A newly opened model: the results of the previous one go, ``plan`` (the one saved
        with this model) becomes the plan, with nothing to undo."""
        self.model_path, self.model = opened.path, opened.model
        self.graph, self.layout = opened.graph, opened.layout
        self.profile = self.comparison = self.optimized = None
        self.advice = None
        self.opened.emit(opened)
        self.plan.replace(plan or [], "restore plan")
        self.plan.clear_history()

    def set_profile(self, profile: Profile, machine: Machine | None = None) -> None:
        """A baseline profile: the comparison made against the previous one no longer shows."""
        self.profile, self.comparison = profile, None
        if machine is not None:
            self.machine = machine
        self.profiled.emit(profile)

    def set_comparison(self, optimized: OptimizeResult,
                       comparison: Comparison | NotCompared) -> None:
        """The optimized model and its comparison; one that could not be compared is kept
        (it can be saved) and announced with the reason."""
        if isinstance(comparison, NotCompared):
            self.optimized, self.comparison = optimized, None
            self.not_compared.emit(comparison)
            return
        self.optimized, self.comparison = optimized, comparison
        self.profile = comparison.before
        self.compared.emit(comparison)

    def set_advice(self, advice: AnyAdvice) -> None:
        """Advice; a per-node scan also brings the machine's ceilings and, when nothing was
        profiled yet, a baseline (the scan's own)."""
        self.advice = advice
        if isinstance(advice, Advice):
            self.machine = advice.machine
            if self.profile is None:
                self.set_profile(advice.sensitivity.baseline)
        self.advised.emit(advice)

    # --- questions ----------------------------------------------------------------------------
    def slowest(self) -> list[NodeStats]:
        """The profiled operators, slowest first (none before a profile)."""
        return sorted(self.profile.nodes, key=lambda s: -s.p50_ms) if self.profile else []

    # --- files --------------------------------------------------------------------------------
    def save_optimized(self, path: str | Path, overwrite: bool = False) -> Path:
        if self.optimized is None:
            raise OpstudioError("nothing to save: run Optimize & compare first")
        if self.model_path is not None and Path(path).resolve() == self.model_path:
            raise OpstudioError(f"{path}: is the original model; choose another file")
        return save_model(self.optimized.model, path, overwrite=overwrite)

    def save_optimized_folder(self, folder: str | Path, overwrite: bool = False) -> FolderExport:
        """The optimized model as a folder its runtime loads (``core.deploy``), for a model
        that came from an onnxruntime-genai or HF/optimum folder."""
        if self.optimized is None or self.model_path is None:
            raise OpstudioError("nothing to save: run Optimize & compare first")
        return write_folder(self.optimized.model, self.model_path, folder,
                            steps=self.optimized.steps, overwrite=overwrite)

    def export_olive(self, path: str | Path) -> Path:
        """The plan as an Olive workflow config (``core.olive``); Olive writes its result to
        ``olive_output`` beside it. The dialog already asked before replacing a file."""
        import json

        from opstudio.core.fileio import write_text_atomic
        from opstudio.core.plan.olive import olive_workflow

        if self.model is None or self.model_path is None:
            raise OpstudioError("open a model first")
        p = Path(path)
        export = olive_workflow(self.plan.recipe(), self.model, self.model_path,
                                p.absolute().parent / "olive_output")
        return write_text_atomic(p, json.dumps(export.workflow, indent=2) + "\n", overwrite=True)

    def export_report(self, path: str | Path) -> Path:
        """HTML, JSON or CSV by the file's extension."""
        if self.comparison is None:
            raise OpstudioError("nothing to export: run Optimize & compare first")
        p = Path(path)
        steps = self.optimized.steps if self.optimized is not None else ()
        suffix = p.suffix.lower()
        if suffix == ".json":
            return report.write_json(self.comparison, p, steps)
        if suffix == ".csv":
            return report.write_csv(self.comparison, p)
        title = self.model_path.name if self.model_path else ""
        return report.write_html(self.comparison, p, steps, title=title)


def profile_summary(profile: Profile) -> str:
    """The status line after a profile: the time per run and the first thing to know."""
    total = profile.total_ms.get("p50") or profile.total_ms.get("mean", 0.0)
    step = getattr(profile, "step", "")
    message = f"Profiled{f' ({step})' if step else ''}: {total:.3f} ms per run (p50)"
    return message + (" — " + profile.notes[0] if profile.notes else "")


def not_compared_summary(not_compared: NotCompared) -> str:
    """What the app says when Optimize & compare could only optimize."""
    return (f"Optimized (the model can be saved); speed and accuracy not measured: "
            f"{not_compared.reason}. Give the dims a value, or inputs in an .npz, in Run "
            "settings… to measure them")


def comparison_summary(comparison: Comparison) -> str:
    """The status line after Optimize & compare: for a decoder whose request was estimated,
    its first token and tokens/s first; then the verdict with its interval
    (``Comparison.verdict_text``: faster, slower, "≈ 1×" or too few runs to tell), named by the
    step it timed, and how quiet the machine was."""
    verdict = comparison.verdict_text()
    if not verdict:
        return "Optimized"
    timed = "without the profiler" if comparison.plain_ratio is not None else "profiled"
    noise = comparison.noise()
    request = comparison.request
    first = ""
    if request is not None:
        parts = [f"{what} {r.label()}" for what, r in (("first token", request.ttft),
                                                        ("tokens/s", request.decode))
                 if r is not None]
        if parts:
            first = (f"per request of {request.before.prompt}+{request.before.generate} "
                     f"tokens, {', '.join(parts)}; ")
    step = f"{comparison.step}: " if comparison.step else ""
    return (f"Optimized: {first}{step}{verdict} ({timed})" + (f" — {noise}" if noise else ""))
