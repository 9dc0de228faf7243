"""What a measurement is asked for, in two halves: how to run (``RunSettings``: runs, warm-up,
threads, optimization level, provider, budgets, timeout) and what to feed (``FeedSpec``: dims,
shapes, an inputs file, the seed, the phase and past of a KV-cache decoder, a request, the text
accuracy is judged on). A feed spec is resolved once per model into a ``workload.Workload``;
measuring functions take the run settings and the workload.

``ProfileSettings`` is both halves in one object: what the command line's flags and the app's
Run settings hold, and what a profile's JSON carries as its ``settings``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from opstudio.core.errors import OpstudioError

OPT_LEVELS = ("disable", "basic", "extended", "all")
# how a decode step's past and present KV cache are fed (``kv_buffer``)
KV_BUFFERS = ("auto", "copy", "shared")

_T = TypeVar("_T")


def _own(obj: Any, cls: type) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(cls)}


def _picked(cls: type[_T], data: Mapping[str, Any]) -> _T:
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunSettings:
    """How a model is run while it is measured."""

    runs: int = 20
    warmup: int = 3
    threads: int = 0  # intra-op threads; 0 = onnxruntime's default
    opt_level: str = "all"
    provider: str = "CPUExecutionProvider"
    time_budget_s: float | None = None  # stop timed runs once this much time was spent
    timeout_s: float = 600.0
    measure_plain: bool = True
    # keep running until the total's 95 % interval is within this many percent of its median
    until_stable: float | None = None
    # a GroupQueryAttention decoder's past and present in one buffer, as onnxruntime-genai
    # runs it (``kv_buffer``): "auto" when its genai_config.json says so, "shared", "copy"
    kv_buffer: str = "auto"

    def validate(self, check_provider: bool = True) -> None:
        if not isinstance(self.runs, int) or self.runs < 1:
            raise OpstudioError(f"runs must be at least 1, not {self.runs}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise OpstudioError(f"warm-up runs cannot be negative ({self.warmup})")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise OpstudioError(f"threads must be 0 (onnxruntime's default) or more, not {self.threads}")
        if self.opt_level not in OPT_LEVELS:
            raise OpstudioError(
                f"optimization level {self.opt_level!r} is not one of {', '.join(OPT_LEVELS)}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise OpstudioError(f"time budget must be positive, not {self.time_budget_s}")
        if not self.timeout_s > 0:
            raise OpstudioError(f"timeout must be positive, not {self.timeout_s}")
        if self.until_stable is not None and not 0 < self.until_stable < 100:
            raise OpstudioError(
                f"--until-stable takes a percentage between 0 and 100, not {self.until_stable}")
        if self.kv_buffer not in KV_BUFFERS:
            raise OpstudioError(
                f"--kv-buffer takes one of {', '.join(KV_BUFFERS)}, not {self.kv_buffer!r}")
        if check_provider:
            import onnxruntime as ort

            available = ort.get_available_providers()
            if self.provider not in available:
                raise OpstudioError(
                    f"execution provider {self.provider!r} is not available here "
                    f"(available: {', '.join(available)})")

    def to_json(self) -> dict[str, Any]:
        """All fields, of a ``ProfileSettings`` too (``from_json`` keeps those it knows)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSettings:
        return _picked(RunSettings, data)


@dataclass
class FeedSpec:
    """What a model is fed while it is measured, before it is resolved against the model."""

    dims: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    inputs_path: str | None = None
    seed: int = 0
    phase: str | None = None  # "prefill" or "decode" for a KV-cache decoder (model.phases)
    past: int | None = None  # past length of a decode step
    # also estimate a request of a KV-cache decoder: prefill of a prompt, then decode steps
    # (measure.request; compare does when the model has a KV cache)
    request: bool = False
    request_prompt: int = 128
    request_generate: int = 128
    # the text a language model's accuracy is judged and calibrated on when no inputs_path is
    # given (measure.text_prompt): a text file (None: the built-in passage) and a tokenizer.json
    # (None: the one beside the model, if any)
    prompt_text: str | None = None
    tokenizer: str | None = None

    def validate(self) -> None:
        from opstudio.core.model.phases import check_phase, check_request

        check_phase(self.phase, self.past)
        if self.request:
            check_request(self.request_prompt, self.request_generate)


@dataclass
class ProfileSettings(FeedSpec, RunSettings):
    """Both halves, as the command line and the app's Run settings hold them."""

    def validate(self, check_provider: bool = True) -> None:
        RunSettings.validate(self, check_provider)
        FeedSpec.validate(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProfileSettings:
        return _picked(ProfileSettings, data)

    @classmethod
    def of(cls, run: RunSettings, feed: FeedSpec) -> ProfileSettings:
        """The pair of a run's settings and the feed it ran on (a profile's ``settings``)."""
        return ProfileSettings(**_own(run, RunSettings), **_own(feed, FeedSpec))
