"""Numbered families of tensors shown as one entry: a decoder's 60 KV-cache inputs read
``past_key_values.{0..29}.{key,value}: float32 [batch_size,2,past_sequence_length,16]``.

Two steps, both on names alone plus dtype and shape:

1. tensors whose names differ in one whole number only, with the same dtype and shape, form a
   family: ``past_key_values.{0..29}.key`` (layer numbers that skip read ``{0..5,7}``);
2. families (or lone tensors whose names hold a number) that differ in one word only, with the
   same dtype, shape and numbers, merge: ``{key,value}``, as in ``past_{key,value}_{0..29}``.

Every entry expands back to exactly its members (the braces read as in a shell: a product of
alternatives, ``a..b`` an inclusive range). Tensors that fall in no family stay as they are, and
every entry sits where its first member is in the model's list. Names holding braces or commas
are never grouped, so no label is ambiguous.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from opstudio.core.model.tensors import Shape, TensorInfo

_NUMBER = re.compile(r"(\d+)")
_TOKEN = re.compile(r"[A-Za-z0-9]+|\x00|[^A-Za-z0-9\x00]+")
_HOLE = "\x00"  # where the family's number goes in a template


@dataclass(frozen=True)
class TensorGroup:
    label: str  # "past_key_values.{0..29}.{key,value}", or the name of a lone tensor
    dtype: str | None
    shape: Shape
    members: tuple[str, ...]  # in the model's order


def shape_text(shape: Shape) -> str:
    if shape is None:
        return "?"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def describe(group: TensorGroup) -> str:
    """``label: dtype [shape]``."""
    return f"{group.label}: {group.dtype or '?'} {shape_text(group.shape)}"


def describe_tensors(tensors: Sequence[TensorInfo]) -> list[str]:
    """One ``label: dtype [shape]`` per group, in the model's order."""
    return [describe(g) for g in group_tensors(tensors)]


def name_list(names: Iterable[str]) -> str:
    """Names joined by commas, numbered families folded (for messages): 'none' when empty."""
    return ", ".join(g.label for g in group_tensors([TensorInfo(n) for n in names])) or "none"


def number_set(numbers: Iterable[int]) -> str:
    """``0..5,7``: runs of three or more as ranges."""
    values = sorted(set(numbers))
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{values[i]}..{values[j]}")
        else:
            parts.extend(str(v) for v in values[i:j + 1])
        i = j + 1
    return ",".join(parts)


@dataclass
class _Family:
    tokens: list[str]  # the template's words and separators; _HOLE for the number
    numbers: tuple[int, ...]  # sorted; () for a lone tensor
    dtype: str | None
    shape: Shape
    members: list[int]  # indices into the tensor list

    def key(self, skip: int) -> tuple:
        return (tuple(self.tokens[:skip]), tuple(self.tokens[skip + 1:]), len(self.tokens),
                self.numbers, self.dtype, _shape_key(self.shape))


def _shape_key(shape: Shape) -> tuple | None:
    return None if shape is None else tuple(shape)


def group_tensors(tensors: Sequence[TensorInfo]) -> list[TensorGroup]:
    """The tensors as groups (see the module docstring), in the order of their first member."""
    families, lone = _families(tensors)
    numbered = families + [_Family(_TOKEN.findall(tensors[i].name), (), tensors[i].dtype,
                                   tensors[i].shape, [i])
                           for i in lone if _NUMBER.search(tensors[i].name)
                           and not _unsafe(tensors[i].name)]
    merged = _merge_words(numbered)
    grouped = {i for _, members in merged for i in members}
    entries = [(members, label) for label, members in merged]
    entries += [([i], tensors[i].name) for i in range(len(tensors)) if i not in grouped]
    entries.sort(key=lambda e: min(e[0]))
    return [TensorGroup(label, tensors[m[0]].dtype, tensors[m[0]].shape,
                        tuple(tensors[i].name for i in sorted(m))) for m, label in entries]


def _unsafe(name: str) -> bool:
    return any(c in name for c in "{},\x00")


def _families(tensors: Sequence[TensorInfo]) -> tuple[list[_Family], list[int]]:
    """Step 1: tensors that differ in one number; the rest by index."""
    candidates: dict[tuple, list[tuple[int, int]]] = defaultdict(list)  # key -> (index, number)
    first_seen: dict[tuple, tuple[int, int]] = {}
    for i, t in enumerate(tensors):
        if _unsafe(t.name):
            continue
        parts = _NUMBER.split(t.name)
        for k in range(1, len(parts), 2):
            if parts[k] != str(int(parts[k])):  # "01" is text, it would not print back
                continue
            template = "".join(_HOLE if j == k else p for j, p in enumerate(parts))
            key = (template, t.dtype, _shape_key(t.shape))
            candidates[key].append((i, int(parts[k])))
            first_seen.setdefault(key, (i, k))
    order = sorted(candidates, key=lambda c: (-len(candidates[c]), first_seen[c]))
    taken: set[int] = set()
    families: list[_Family] = []
    for key in order:
        members = [(i, n) for i, n in candidates[key] if i not in taken]
        if len(members) < 2:
            continue
        taken.update(i for i, _ in members)
        template, _, _ = key
        t = tensors[members[0][0]]
        families.append(_Family(_TOKEN.findall(template), tuple(sorted(n for _, n in members)),
                                t.dtype, t.shape, [i for i, _ in members]))
    return families, [i for i in range(len(tensors)) if i not in taken]


def _merge_words(families: list[_Family]) -> list[tuple[str, list[int]]]:
    """Step 2: families differing in one word merge; each result as (label, members)."""
    candidates: dict[tuple, list[int]] = defaultdict(list)  # key -> family indices
    where: dict[tuple, int] = {}
    for f_index, f in enumerate(families):
        for pos, tok in enumerate(f.tokens):
            if tok.isalpha():  # a word: "key"/"value", not "y01"/"y02"
                key = (pos, *f.key(pos))
                candidates[key].append(f_index)
                where.setdefault(key, min(f.members))
    order = sorted(candidates, key=lambda c: (-len(candidates[c]), where[c], c[0]))
    used: set[int] = set()
    out: list[tuple[str, list[int]]] = []
    for key in order:
        chosen = [k for k in candidates[key] if k not in used]
        if len(chosen) < 2:
            continue
        used.update(chosen)
        pos = key[0]
        words = list(dict.fromkeys(families[k].tokens[pos] for k in chosen))
        tokens = list(families[chosen[0]].tokens)
        tokens[pos] = "{" + ",".join(words) + "}"
        out.append((_label(tokens, families[chosen[0]].numbers),
                    sorted(i for k in chosen for i in families[k].members)))
    for k, f in enumerate(families):
        if k not in used and f.numbers:
            out.append((_label(f.tokens, f.numbers), sorted(f.members)))
    return out


def _label(tokens: list[str], numbers: tuple[int, ...]) -> str:
    return "".join("{" + number_set(numbers) + "}" if t == _HOLE else t for t in tokens)
