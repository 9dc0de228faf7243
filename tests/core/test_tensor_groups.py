"""Numbered tensor families folded into one entry: labels, order, and the round trip of every
label back to exactly its members."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opstudio.core.model.tensor_groups import describe_tensors, group_tensors, name_list, number_set
from opstudio.core.model.tensors import TensorInfo

KV = ["batch_size", 2, "past_sequence_length", 16]


def expand(label: str) -> list[str]:
    """A label read as a shell reads braces: the product of the alternatives, a..b a range."""
    pieces = re.split(r"(\{[^{}]*\})", label)
    choices = []
    for piece in pieces:
        if piece.startswith("{"):
            alts: list[str] = []
            for item in piece[1:-1].split(","):
                lo, sep, hi = item.partition("..")
                alts += [str(n) for n in range(int(lo), int(hi) + 1)] if sep else [item]
            choices.append(alts)
        else:
            choices.append([piece])
    return ["".join(p) for p in itertools.product(*choices)]


def kv_inputs(layers, kinds=("key", "value"), prefix="past_key_values", shape=KV,
              keys_first=False):
    if keys_first:  # as onnxruntime-genai's builder lists them
        return [TensorInfo(f"{prefix}.{i}.{k}", "float32", shape) for k in kinds for i in layers]
    return [TensorInfo(f"{prefix}.{i}.{k}", "float32", shape) for i in layers for k in kinds]


IDS = TensorInfo("input_ids", "int64", ["batch_size", "sequence_length"])
MASK = TensorInfo("attention_mask", "int64", ["batch_size", "total_sequence_length"])
POS = TensorInfo("position_ids", "int64", ["batch_size", "sequence_length"])


@pytest.mark.parametrize("tensors, lines", [
    # HF/optimum: key and value of each layer in turn; position_ids keeps its place and is
    # not merged with input_ids although both are int64 [batch_size,sequence_length]
    ([IDS, MASK, POS, *kv_inputs(range(30))],
     ["input_ids: int64 [batch_size,sequence_length]",
      "attention_mask: int64 [batch_size,total_sequence_length]",
      "position_ids: int64 [batch_size,sequence_length]",
      "past_key_values.{0..29}.{key,value}: float32 [batch_size,2,past_sequence_length,16]"]),
    # onnxruntime-genai: every key, then every value
    ([IDS, MASK, *kv_inputs(range(18), keys_first=True)],
     ["input_ids: int64 [batch_size,sequence_length]",
      "attention_mask: int64 [batch_size,total_sequence_length]",
      "past_key_values.{0..17}.{key,value}: float32 [batch_size,2,past_sequence_length,16]"]),
    # outputs
    ([TensorInfo("logits", "float32", ["batch_size", "sequence_length", 64]),
      *kv_inputs(range(4), prefix="present")],
     ["logits: float32 [batch_size,sequence_length,64]",
      "present.{0..3}.{key,value}: float32 [batch_size,2,past_sequence_length,16]"]),
    # layer numbers that skip
    (kv_inputs([0, 1, 2, 3, 4, 5, 7]),
     ["past_key_values.{0..5,7}.{key,value}: float32 [batch_size,2,past_sequence_length,16]"]),
    # one layer with another shape is its own entry, where it stands
    (kv_inputs(range(3)) + kv_inputs([3], shape=["batch_size", 2, "past_sequence_length", 32])
     + kv_inputs([4]),
     ["past_key_values.{0..2,4}.{key,value}: float32 [batch_size,2,past_sequence_length,16]",
      "past_key_values.3.{key,value}: float32 [batch_size,2,past_sequence_length,32]"]),
    # keys and values in different dtypes stay apart
    ([TensorInfo(f"cache.{i}.key", "float16", [1]) for i in range(3)]
     + [TensorInfo(f"cache.{i}.value", "float32", [1]) for i in range(3)],
     ["cache.{0..2}.key: float16 [1]", "cache.{0..2}.value: float32 [1]"]),
    # the number at the end, the word in the middle
    ([TensorInfo(f"past_{k}_{i}", "float16", [1, 4]) for i in range(12) for k in ("key", "value")],
     ["past_{key,value}_{0..11}: float16 [1,4]"]),
    # whisper-style: decoder and encoder caches of different shapes
    ([TensorInfo(f"past_key_values.{i}.{part}.{k}", "float32", [1, 6, part, 64])
      for i in range(2) for part in ("decoder", "encoder") for k in ("key", "value")],
     ["past_key_values.{0,1}.decoder.{key,value}: float32 [1,6,decoder,64]",
      "past_key_values.{0,1}.encoder.{key,value}: float32 [1,6,encoder,64]"]),
    # a lone tensor, names with leading zeros, and an unknown shape
    ([TensorInfo("x", None, None), TensorInfo("y01", "int8", [2]), TensorInfo("y02", "int8", [2])],
     ["x: ? ?", "y01: int8 [2]", "y02: int8 [2]"]),
])
def test_groups(tensors, lines):
    assert describe_tensors(tensors) == lines


@pytest.mark.parametrize("numbers, text", [
    ([0], "0"), ([0, 1], "0,1"), ([0, 1, 2], "0..2"), ([5, 0, 1, 2, 3, 4, 7], "0..5,7"),
    ([0, 2, 4], "0,2,4"), ([9, 10, 11, 20, 21], "9..11,20,21")])
def test_number_set(numbers, text):
    assert number_set(numbers) == text


def test_name_list():
    assert name_list([]) == "none"
    assert name_list(["ids", *(f"present.{i}.{k}" for i in range(4) for k in ("key", "value"))]) \
        == "ids, present.{0..3}.{key,value}"


def test_thirty_layers_fit_in_one_short_line():
    line = ", ".join(describe_tensors([IDS, MASK, *kv_inputs(range(30))]))
    long = ", ".join(f"{t.name}: float32 [batch_size,2,past_sequence_length,16]"
                     for t in kv_inputs(range(30)))
    assert len(line) < 200 < 3000 < len(long)


_WORDS = st.sampled_from(["past", "key", "value", "present", "cache", "k", "v", "h", "layers"])
_SEPS = st.sampled_from([".", "_", "/"])
_NAME = st.lists(st.one_of(_WORDS, st.integers(0, 12).map(str)), min_size=1, max_size=5).flatmap(
    lambda parts: st.lists(_SEPS, min_size=len(parts) - 1, max_size=len(parts) - 1).map(
        lambda seps: "".join(p + s for p, s in itertools.zip_longest(parts, seps, fillvalue=""))))
_TENSOR = st.tuples(_NAME, st.sampled_from(["float32", "float16"]),
                    st.sampled_from([(1, 2), ("b", 2), (1, "past")]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_TENSOR, max_size=40, unique_by=lambda t: t[0]))
def test_every_label_expands_back_to_its_members(specs):
    tensors = [TensorInfo(n, d, list(s)) for n, d, s in specs]
    groups = group_tensors(tensors)
    index = {t.name: i for i, t in enumerate(tensors)}
    members = [m for g in groups for m in g.members]
    assert sorted(members) == sorted(index)  # each tensor in exactly one group
    firsts = [index[g.members[0]] for g in groups]
    assert firsts == sorted(firsts)  # where their first member stands
    for g in groups:
        assert sorted(expand(g.label)) == sorted(g.members)
        assert [index[m] for m in g.members] == sorted(index[m] for m in g.members)
        for m in g.members:
            t = tensors[index[m]]
            assert (t.dtype, t.shape) == (g.dtype, g.shape)
        if len(g.members) == 1:
            assert g.label == g.members[0]
