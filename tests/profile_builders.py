"""Hand-made profiles for tests of what reads a profile (compare, roofline, reports)."""

from __future__ import annotations

from collections.abc import Sequence

from opstudio.core.measure.profiler import NodeStats, Profile, ProfileSettings


def node_stats(name: str, ms: float, op: str = "MatMul", group: Sequence[str] = (),
               share: float = 0.0) -> NodeStats:
    """One operator that took ``ms`` on every run."""
    return NodeStats(name=name, op_type=op, mean_ms=ms, p50_ms=ms, p90_ms=ms, min_ms=ms,
                     std_ms=0.0, calls=1, share=share, kernels=[name], group=list(group))


def profile_of(*nodes: NodeStats) -> Profile:
    """A profile holding ``nodes`` (totals of 1 ms; they are not what these tests read)."""
    p = Profile.from_json({"model": "m", "settings": ProfileSettings().to_json(),
                           "total_ms": {"mean": 1, "p50": 1, "p90": 1, "min": 1, "std": 0},
                           "nodes": [], "op_types": [], "unattributed_ms": 0.0})
    p.nodes = list(nodes)
    return p
