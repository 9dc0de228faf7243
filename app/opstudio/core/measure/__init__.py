"""Measuring a model on onnxruntime: the inputs a run is fed, profiles, paired timing,
accuracy, requests, the roofline, memory and comparisons. Imports the model layer and the
support modules, never the passes or the planning code.

The names below are the layer's public API; its modules stay importable for tests and for
monkeypatching."""

from __future__ import annotations

from opstudio.core.measure.accuracy import (
    SYNTHETIC,
    agreement_low,
    agreement_per_position,
    compare_outputs,
    kl_per_position,
    output_kind,
    run_outputs,
)
from opstudio.core.measure.compare import (
    ADDED,
    FUSED,
    REMOVED,
    SAME,
    Comparison,
    NodeDelta,
    NotCompared,
    compare_models,
    interval_text,
    match_nodes,
    operators_changed,
    speedup_label,
)
from opstudio.core.measure.generate import Generation, Greedy, SideBySide, side_by_side_isolated
from opstudio.core.measure.inputs import (
    NeedsInputs,
    build_inputs,
    decode_step_dims,
    default_dim,
    make_inputs,
    run_dims,
)
from opstudio.core.measure.memory import weight_bytes
from opstudio.core.measure.profile import NodeStats, Profile
from opstudio.core.measure.profiler import profile_model, profile_models
from opstudio.core.measure.request import (
    DEFAULT_GENERATE,
    DEFAULT_PROMPT,
    RequestComparison,
    RequestEstimate,
    decode_pasts,
    duration,
    estimate_requests,
    has_kv_cache,
    rate,
    require_kv_cache,
    with_interval,
)
from opstudio.core.measure.roofline import (
    Machine,
    analyze_roofline,
    cached_machine,
    dims_from_inputs,
    measure_machine,
    profile_roofline,
    profile_with_machine,
)
from opstudio.core.measure.rounds import unsettled_note
from opstudio.core.measure.settings import OPT_LEVELS, FeedSpec, ProfileSettings, RunSettings
from opstudio.core.measure.text_prompt import find_tokenizer, judging, with_text_prompt
from opstudio.core.measure.timing import (
    FASTER,
    SLOWER,
    UNDECIDED,
    Ratio,
    interleaved_times,
    median_interval,
    paired_ratio,
    paired_speedup,
    quiet_rounds,
    session,
)
from opstudio.core.measure.workload import Workload

__all__ = [
    "ADDED",
    "DEFAULT_GENERATE",
    "DEFAULT_PROMPT",
    "FASTER",
    "FUSED",
    "OPT_LEVELS",
    "REMOVED",
    "SAME",
    "SLOWER",
    "SYNTHETIC",
    "UNDECIDED",
    "Comparison",
    "FeedSpec",
    "Generation",
    "Greedy",
    "Machine",
    "NeedsInputs",
    "NodeDelta",
    "NodeStats",
    "NotCompared",
    "Profile",
    "ProfileSettings",
    "Ratio",
    "RequestComparison",
    "RequestEstimate",
    "RunSettings",
    "SideBySide",
    "Workload",
    "agreement_low",
    "agreement_per_position",
    "analyze_roofline",
    "build_inputs",
    "cached_machine",
    "compare_models",
    "compare_outputs",
    "decode_pasts",
    "decode_step_dims",
    "default_dim",
    "dims_from_inputs",
    "duration",
    "estimate_requests",
    "find_tokenizer",
    "has_kv_cache",
    "interleaved_times",
    "interval_text",
    "judging",
    "kl_per_position",
    "make_inputs",
    "match_nodes",
    "measure_machine",
    "median_interval",
    "operators_changed",
    "output_kind",
    "paired_ratio",
    "paired_speedup",
    "profile_model",
    "profile_models",
    "profile_roofline",
    "profile_with_machine",
    "quiet_rounds",
    "rate",
    "require_kv_cache",
    "run_dims",
    "run_outputs",
    "session",
    "side_by_side_isolated",
    "speedup_label",
    "unsettled_note",
    "weight_bytes",
    "with_interval",
    "with_text_prompt",
]
