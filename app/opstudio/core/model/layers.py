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

import dataclasses
import re
from collections import defaultdict, deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from opstudio.core.model.graph import GraphInfo, NodeInfo

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
    def totals(self, values: Mapping[str, float | None] | Sequence[float | None], *,
               every_node: bool = False) -> Totals:
        """Per layer, per module and per role sums of a per-node quantity (ms, FLOPs, bytes),
        given by node name or by node index; unknown values (None, missing) are left out, or
        with ``every_node`` make the sums they fall in unknown (``GraphInfo.sums_need_every_node``)."""
        if isinstance(values, Mapping):
            get = values.get
            per_node = [get(s.name) for s in self.scopes]
        else:
            per_node = list(values)
        t = Totals()
        unknown: set[tuple[str, object]] = set()  # (which sums, key): a member had no value

        def add(d: dict, which: str, key: object, v: float | None) -> None:
            if v is None:
                d.setdefault(key, None)
                if every_node:
                    unknown.add((which, key))
                    d[key] = None
            elif (which, key) not in unknown:
                d[key] = (d.get(key) or 0.0) + v

        whole: dict[None, float | None] = {}
        for s, v in zip(self.scopes, per_node, strict=False):
            if s.layer is None:
                add(t.outside, "outside", s.module, v)
            else:
                key = (s.stack, s.layer)
                add(t.by_layer, "layer", key, v)
                add(t.by_layer_module, "layer_module", (key, s.module), v)
                add(t.by_module, "module", s.module, v)
                add(t.by_role, "role", s.role, v)
            add(whole, "total", None, v)
        t.total = whole.get(None)
        return t


def group_layers(names: Iterable[str]) -> LayerGrouping:
    return LayerGrouping(list(names))


@dataclass
class Collapsed:
    """A graph with some layers folded into one node each (for display).

    ``graph`` has one node per box: every node outside the folded layers and one per folded
    layer; ``box_of[i]`` is the box showing node ``i`` and ``members[b]`` the nodes of box ``b``.
    """

    graph: GraphInfo
    box_of: np.ndarray
    members: list[np.ndarray]
    layers: dict[int, LayerKey]  # box -> the layer it folds

    @property
    def keys(self) -> set[LayerKey]:
        return set(self.layers.values())


def collapse_layers(graph: GraphInfo, grouping: LayerGrouping,
                    keys: Collection[LayerKey]) -> Collapsed:
    """Fold each layer of ``keys`` into one node. A layer that a path leaves and re-enters
    (through a node outside it) can't be one node of an acyclic graph: it stays open."""
    wanted = [k for k in grouping.layers() if k in set(keys)]
    done = _collapse(graph, grouping, wanted)
    if done is None:
        kept: list[LayerKey] = []
        for k in wanted:
            if _collapse(graph, grouping, [*kept, k]) is not None:
                kept.append(k)
        done = _collapse(graph, grouping, kept)
        assert done is not None
    return done


def _collapse(graph: GraphInfo, grouping: LayerGrouping,
              keys: list[LayerKey]) -> Collapsed | None:
    chosen = set(keys)
    box_of = np.empty(len(graph.nodes), dtype=np.int64)
    members: list[list[int]] = []
    nodes: list[NodeInfo] = []
    layer_box: dict[LayerKey, int] = {}
    for n in graph.nodes:
        key = grouping.layer_of(n.index)
        if key is not None and key in chosen:
            b = layer_box.get(key)
            if b is None:
                b = layer_box[key] = len(members)
                members.append([])
                label = grouping.layer_label(key)
                nodes.append(NodeInfo(index=b, name="", op_type=label, domain="", inputs=[],
                                      outputs=[], output_shapes=[]))
            members[b].append(n.index)
        else:
            b = len(members)
            members.append([n.index])
            nodes.append(dataclasses.replace(n, index=b))
        box_of[n.index] = b
    for b in layer_box.values():
        inner = [graph.nodes[i] for i in members[b]]
        nodes[b].name = f"{len(inner)} operators"
        known = [x.flops for x in inner if x.flops is not None]
        whole = len(known) == len(inner) or not graph.sums_need_every_node()
        nodes[b].flops = sum(known) if known and whole else None
        nodes[b].param_bytes = sum(x.param_bytes for x in inner)
    edges: list[tuple[int, int, str]] = []
    seen: set[tuple[int, int]] = set()
    for s, d, tensor in graph.edges:
        a, b = int(box_of[s]), int(box_of[d])
        if a != b and (a, b) not in seen:
            seen.add((a, b))
            edges.append((a, b, tensor))
    if not _acyclic(len(nodes), edges):
        return None
    folded = GraphInfo(nodes=nodes, edges=edges, inputs=graph.inputs, outputs=graph.outputs,
                       tensors=graph.tensors, opset=graph.opset, ir_version=graph.ir_version,
                       producer=graph.producer, constant_bytes=graph.constant_bytes)
    return Collapsed(folded, box_of, [np.array(m, dtype=np.int64) for m in members],
                     {b: k for k, b in layer_box.items()})


def _acyclic(n: int, edges: list[tuple[int, int, str]]) -> bool:
    indegree = [0] * n
    out: list[list[int]] = [[] for _ in range(n)]
    for a, b, _ in edges:
        out[a].append(b)
        indegree[b] += 1
    ready = deque(i for i in range(n) if not indegree[i])
    visited = 0
    while ready:
        i = ready.popleft()
        visited += 1
        for j in out[i]:
            indegree[j] -= 1
            if not indegree[j]:
                ready.append(j)
    return visited == n
