"""Many reasons, told once each with a count.

When a recipe step skips hundreds of nodes, or the advisor could apply none of its candidates,
the reasons mostly differ only in the node or tensor they name (``its weight 'w0' is a graph
input``, ``its weight 'w1' is a graph input``). Grouping them with the quoted names blanked
out tells the user the few causes that matter, with how many nodes each one hit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_QUOTED = re.compile(r"'[^']*'")


def group(reasons: Iterable[str]) -> list[tuple[str, int]]:
    """``(reason, count)``, most frequent first (then first seen). A reason that occurs once
    keeps its names; one shared by several has them blanked (``'…'``)."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for reason in reasons:
        key = _QUOTED.sub("'…'", reason)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, reason)
    order = sorted(counts, key=lambda k: -counts[k])  # stable: ties stay in first-seen order
    return [(first[k] if counts[k] == 1 else k, counts[k]) for k in order]


def summarise(reasons: Iterable[str], limit: int = 3) -> str:
    """One line: ``reason ×3 | other reason | +2 more reasons`` (reasons hold ``;`` themselves)."""
    groups = group(reasons)
    parts = [f"{text} ×{n}" if n > 1 else text for text, n in groups[:limit]]
    if len(groups) > limit:
        parts.append(f"+{len(groups) - limit} more reason{'s' if len(groups) - limit > 1 else ''}")
    return " | ".join(parts)
