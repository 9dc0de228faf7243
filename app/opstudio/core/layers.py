"""Operators grouped the way LLM users think of them: by layer, module and role.

A decoder is 24–30 copies of one block, and exporters say so in node names: onnxruntime-genai and
torch.onnx write ``/model/layers.3/mlp/up_proj/MatMul``, torch-style names read
``model.layers.3.mlp.up_proj``, GPT-2 ``transformer.h.5.attn…``, BERT ``encoder.layer.2…``, ViT
``blocks.7…``. From the name alone each node gets

- a layer: the stack it belongs to (``model.layers``, ``encoder.layer``) and its index there;
- a role: its path inside the layer (``mlp/up_proj/MatMul``), the same in every layer, so "every
  up_proj of every layer" is the set of nodes sharing a role;
- a module kind: attention, MLP, norm, embedding, lm_head or other, read from the scope words.

Nodes whose names carry no layer index (the embedding, the final norm, the lm_head, mask helpers)
stay outside the layers. Names are matched with one regular expression each and module kinds are
decided once per distinct role, so a 10k-node graph is grouped in milliseconds.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

ATTENTION, MLP, NORM, EMBEDDING, LM_HEAD, OTHER = (
    "attention", "mlp", "norm", "embedding", "lm_head", "other")
MODULES = (EMBEDDING, NORM, ATTENTION, MLP, LM_HEAD, OTHER)  # display order, as data flows
MODULE_LABELS = {ATTENTION: "attention", MLP: "MLP", NORM: "norms", EMBEDDING: "embedding",
                 LM_HEAD: "lm_head", OTHER: "other"}

# the container word right before the index: layers.3 / layer.2 / h.5 / blocks.7 / block_1;
# the outermost one wins (T5's block.0.layer.1 is block 0)
_LAYER = re.compile(
    r"(?:^|(?<=[/.]))(?P<word>layers|layer|blocks|block|h)[._/](?P<index>\d+)(?=[/._:]|$)")
_SPLIT = re.compile(r"[/.]+")

# scope words, matched against one path token (``self_attn``, ``post_attention_layernorm``);
# norm before attention: a post_attention_layernorm is a norm
_KIND_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (LM_HEAD, re.compile(r"lm_head|^output_projection$|^embed_out$")),
    (NORM, re.compile(r"norm|^ln(_?\d+|_?f|_?[a-z])?$|^rms")),
    (ATTENTION, re.compile(
        r"attn|attention|^(q|k|v|o|qkv|query|key|value|out)(_proj)?$|^(wq|wk|wv|wo_attn)$"
        r"|rotary|^rope")),
    (MLP, re.compile(
        r"mlp|ffn|feed_?forward|^fc_?\d$|^fc_(in|out)$|^c_fc$|^(gate|up|down|gate_up)_proj$"
        r"|^w[123]$|^intermediate$|dense_h_to_4h|dense_4h_to_h|^experts?$|^act(_fn)?$"
        r"|denserelu|densegated|^moe$")),
    (EMBEDDING, re.compile(r"embed|^wte$|^wpe$|^word_embeddings$|^position_embeddings$")),
)
# genai's builder numbers the final norm as one layer past the last
_OUTSIDE_TOKENS = re.compile(r"^final")


@dataclass(frozen=True)
class NodeScope:
    """Where one node sits: ``layer`` is None outside the layers (``role`` is the name then)."""

    name: str
    stack: str  # "model.layers", "encoder.layer"; "" outside the layers
    layer: int | None
    role: str  # "mlp/up_proj/MatMul"
    module: str  # one of MODULES


LayerKey = tuple[str, int]  # (stack, index)


def scope_of(name: str) -> NodeScope:
    """The layer, role and module kind that ``name`` says a node has."""
    m = _LAYER.search(name)
    if m is not None:
        tail = name[m.end():].lstrip("/._:")
        parts = [p for p in (tail.split("/") if "/" in tail else _SPLIT.split(tail)) if p]
        if not (parts and _OUTSIDE_TOKENS.match(parts[0])):
            prefix = [p for p in _SPLIT.split(name[:m.start()]) if p]
            stack = ".".join([*prefix, m["word"]])
            role = "/".join(parts)
            return NodeScope(name, stack, int(m["index"]), role, _module(tuple(parts)))
    parts = [p for p in _SPLIT.split(name) if p]
    return NodeScope(name, "", None, name, _module(tuple(parts)))


_module_cache: dict[tuple[str, ...], str] = {}


def _module(parts: tuple[str, ...]) -> str:
    """The kind named by the outermost path token that names one (the op's own token last)."""
    kind = _module_cache.get(parts)
    if kind is None:
        kind = OTHER
        for token in parts:
            low = token.lower()
            hit = next((k for k, rule in _KIND_RULES if rule.search(low)), None)
            if hit is not None:
                kind = hit
                break
        if len(_module_cache) < 100_000:
            _module_cache[parts] = kind
    return kind


@dataclass
class Totals:
    """Sums of one per-node quantity; a sum is None when no node in it had a value."""

    by_layer: dict[LayerKey, float | None] = field(default_factory=dict)
    by_layer_module: dict[tuple[LayerKey, str], float | None] = field(default_factory=dict)
    by_module: dict[str, float | None] = field(default_factory=dict)  # over every layer
    outside: dict[str, float | None] = field(default_factory=dict)  # by module, no layer
    by_role: dict[str, float | None] = field(default_factory=dict)
    total: float | None = None


class LayerGrouping:
    """The scopes of a graph's nodes (given by name, in node order) and their groups."""

    def __init__(self, names: Sequence[str]) -> None:
        self.scopes = [scope_of(n) for n in names]
        self.index = {s.name: i for i, s in enumerate(self.scopes)}
        layers: dict[LayerKey, list[int]] = defaultdict(list)
        modules: dict[tuple[LayerKey | None, str], list[int]] = defaultdict(list)
        roles: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(self.scopes):
            key = (s.stack, s.layer) if s.layer is not None else None
            modules[(key, s.module)].append(i)
            if key is not None:
                layers[key].append(i)
                roles[s.role].append(i)
        self._layers = dict(sorted(layers.items(), key=lambda kv: (kv[1][0], kv[0])))
        self._modules = dict(modules)
        self._roles = dict(roles)
        stacks = {k[0] for k in self._layers}
        self._one_stack = len(stacks) <= 1

    # --- groups -------------------------------------------------------------------------------
    def layers(self) -> list[LayerKey]:
        """Layers in the order their first node runs."""
        return list(self._layers)

    def has_layers(self) -> bool:
        return bool(self._layers)

    def layer_label(self, key: LayerKey) -> str:
        stack, index = key
        if self._one_stack:
            return f"layer {index}"
        owner = stack.rsplit(".", 1)[0] if "." in stack else stack
        return f"{owner} layer {index}"

    def layer_nodes(self, key: LayerKey) -> list[int]:
        return list(self._layers.get(key, []))

    def modules_of(self, key: LayerKey | None) -> list[str]:
        """Module kinds present in a layer (None: outside the layers), in display order."""
        return [m for m in MODULES if (key, m) in self._modules]

    def module_nodes(self, key: LayerKey | None, module: str) -> list[int]:
        return list(self._modules.get((key, module), []))

    def ungrouped(self) -> list[int]:
        return [i for i, s in enumerate(self.scopes) if s.layer is None]

    def layer_of(self, index: int) -> LayerKey | None:
        s = self.scopes[index]
        return None if s.layer is None else (s.stack, s.layer)

    # --- roles --------------------------------------------------------------------------------
    def roles(self, min_layers: int = 2) -> list[str]:
        """Roles found in at least ``min_layers`` layers, in the order they first run."""
        out = []
        for role, idx in self._roles.items():
            if len({(self.scopes[i].stack, self.scopes[i].layer) for i in idx}) >= min_layers:
                out.append(role)
        return out

    def role_of(self, index: int) -> str | None:
        s = self.scopes[index]
        return None if s.layer is None else s.role

    def role_indices(self, role: str) -> list[int]:
        return list(self._roles.get(role, []))

    def role_nodes(self, role: str) -> list[str]:
        """Names of the nodes playing ``role`` in every layer (``"mlp/up_proj/MatMul"``)."""
        return [self.scopes[i].name for i in self._roles.get(role, [])]

    def module_everywhere(self, module: str) -> list[int]:
        """Nodes of one module kind inside every layer (the MLP of every layer)."""
        return sorted(i for (key, m), idx in self._modules.items()
                      if key is not None and m == module for i in idx)

    # --- totals -------------------------------------------------------------------------------
    def totals(self, values: Mapping[str, float | None] | Sequence[float | None]) -> Totals:
        """Per layer, per module and per role sums of a per-node quantity (ms, FLOPs, bytes),
        given by node name or by node index; unknown values (None, missing) are left out."""
        if isinstance(values, Mapping):
            get = values.get
            per_node = [get(s.name) for s in self.scopes]
        else:
            per_node = list(values)
        t = Totals()

        def add(d: dict, key: object, v: float | None) -> None:
            if v is None:
                d.setdefault(key, None)
            else:
                d[key] = (d.get(key) or 0.0) + v

        for s, v in zip(self.scopes, per_node, strict=False):
            if s.layer is None:
                add(t.outside, s.module, v)
            else:
                key = (s.stack, s.layer)
                add(t.by_layer, key, v)
                add(t.by_layer_module, (key, s.module), v)
                add(t.by_module, s.module, v)
                add(t.by_role, s.role, v)
            if v is not None:
                t.total = (t.total or 0.0) + v
        return t


def group_layers(names: Iterable[str]) -> LayerGrouping:
    return LayerGrouping(list(names))


def layer_table(grouping: LayerGrouping, columns: Mapping[str, Totals]) -> list[list[str]]:
    """Rows for a text report: each layer, then its modules indented, then the nodes outside
    the layers by module; one column per quantity, already formatted by the caller's Totals
    (values are printed with ``_fmt``)."""
    rows: list[list[str]] = []
    names = list(columns)
    for key in grouping.layers():
        rows.append([grouping.layer_label(key),
                     str(len(grouping.layer_nodes(key))),
                     *(_fmt(columns[c].by_layer.get(key)) for c in names)])
        for m in grouping.modules_of(key):
            rows.append([f"  {MODULE_LABELS[m]}", str(len(grouping.module_nodes(key, m))),
                         *(_fmt(columns[c].by_layer_module.get((key, m))) for c in names)])
    for m in grouping.modules_of(None):
        rows.append([f"(no layer) {MODULE_LABELS[m]}", str(len(grouping.module_nodes(None, m))),
                     *(_fmt(columns[c].outside.get(m)) for c in names)])
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= factor:
                return f"{v / factor:.2f}{suffix}"
    return f"{v:.3f}" if v != int(v) else f"{int(v)}"
