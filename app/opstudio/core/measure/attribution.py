"""Which nodes of the model file each onnxruntime kernel executes, and so which original nodes.

With graph optimizations on, onnxruntime rewrites the graph before running it and the profile
names the kernels of the *rewritten* graph. What onnxruntime 1.32 produces (measured here):

- MatMul+Add on a 2-D input → ``fused mm0/MatMulAddFusion`` (FusedGemm, a following Relu folded
  in: its name no longer appears); on a 3-D input → ``mm0/MatMulAddFusion`` (Gemm) between two
  inserted Reshapes named ``gemm_input_reshape`` / ``gemm_output_reshape``;
- Conv(+Relu) on CPU at level "all" → NCHWc kernels named after the *output tensor*
  (``r0_nchwc`` for a conv0+relu0 pair writing ``r0``), intermediate tensors renamed
  ``reorder_token_N``, plus inserted ``ReorderInput``/``ReorderOutput`` kernels;
- decomposed LayerNorm → ``<last Mul>/LayerNormFusion/``; decomposed Gelu → a node named just
  ``Gelu`` (no trace of the original names);
- ``quantize_dynamic`` MatMul → ``mm0_quant`` (DynamicQuantizeMatMul, the scale Muls and Cast
  fused in); ``quantize_dynamic`` Conv → ``conv0_quant`` (ConvInteger) plus separately run
  ``x_QuantizeLinear``, ``conv0_quant_scales_mul``, … nodes; MatMulNBits → ``mm0_Q4``.

Names alone are therefore not enough (``Gelu``, ``r0_nchwc``). What onnxruntime does keep is
the *tensor* names at the boundaries of what it rewrote. So the profiler asks the session to save
the graph it actually runs (``SessionOptions.optimized_model_filepath``; weights go to a side
file that is never read back) and this module maps kernels to nodes through tensors:

1. every tensor of the optimized graph gets its equivalent in the model file: the same name, or
   for an NCHWc kernel's renamed output, the tensor its name carries (``r0_nchwc`` → ``r0``);
2. kernels linked by tensors that have no equivalent (``reorder_token_N``, the Gemm reshapes)
   form one *region*: what onnxruntime fused or split as one piece;
3. a region covers the model-file nodes found by walking back from the tensors it produces to
   tensors that exist at run time (produced by another kernel, graph inputs, weights); nodes
   that only compute constants are skipped unless they produce the region's output;
4. a region of several kernels whose names carry distinct covered nodes (QDQ → QLinearConv +
   NHWC MaxPool + Transposes) is split along those names, so each node keeps its own row;
5. a region that produces nothing new (an inserted ``ReorderOutput``, a copy) is charged to the
   region whose output it reads, or else to the one that reads its output;
6. model-file nodes are mapped to original nodes with ``provenance.get_origin``; regions that
   share an original node become one group, so no original node is ever counted twice.

A kernel not in the saved graph falls back to its name (``fused X/…``, ``X_quant``, ``X_Q4``,
``X_nchwc``, ``X_token_3`` → node or tensor ``X``). Anything still unmatched is returned as
unattributed; the profiler reports its time as such.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from opstudio.core.errors import GraphError
from opstudio.core.model.graph import topological_order
from opstudio.core.model.provenance import get_origin

_NCHWC_SUFFIX = "_nchwc"
_NOT_FOLDABLE = {"Shape", "Size", "RandomNormal", "RandomUniform", "RandomNormalLike",
                 "RandomUniformLike", "Multinomial"}
_NAME_SUFFIXES = re.compile(r"(_nchwc|_quant|_Q4|_Q8|_Q\d+|_token_\d+|_kernel_time)$")


@dataclass
class Group:
    """One row of a profile: the original nodes a set of kernels executes."""

    name: str  # original node name reported for the group
    op_type: str
    members: list[str]  # all original node names covered (``name`` first)
    kernels: list[str] = field(default_factory=list)


@dataclass
class Attribution:
    groups: list[Group]
    kernel_group: dict[str, int]  # kernel name -> index into ``groups``
    unattributed: list[str]  # kernel names no node could be found for
    method: str  # "optimized graph" or "names"

    def group_of(self, kernel: str) -> Group | None:
        i = self.kernel_group.get(kernel)
        return None if i is None else self.groups[i]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class _ModelFile:
    """Lookups over the top-level graph of the model the session loaded."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.by_name = {n.name: n for n in self.nodes if n.name}
        self.position = {n.name: i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
        self.initializers = {t.name for t in g.initializer}
        self.inputs = {i.name for i in g.input}
        self.tensors = set(self.producer) | self.initializers | self.inputs
        # Tensors computable without any graph input: onnxruntime folds these away.
        self.constant = set(self.initializers) - self.inputs
        try:
            order = [self.nodes[i] for i in topological_order(g)]
        except GraphError:
            order = self.nodes
        for n in order:
            if n.op_type in _NOT_FOLDABLE or _has_subgraph(n):
                continue
            if all(i in self.constant for i in n.input if i):
                self.constant.update(o for o in n.output if o)

    def origins(self, node: onnx.NodeProto) -> list[str]:
        return get_origin(node)

    def is_constant_node(self, node: onnx.NodeProto) -> bool:
        return bool(node.output) and all(o in self.constant for o in node.output if o)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


def attribute(model: onnx.ModelProto, kernels: Mapping[str, str],
              optimized: onnx.ModelProto | None = None,
              weights: Mapping[str, float] | None = None) -> Attribution:
    """Map profiled kernels to groups of original nodes.

    ``model`` is the model file the session loaded (node names unique), ``kernels`` maps each
    top-level kernel name (the trace name without ``_kernel_time``) to its op type,
    ``optimized`` is the graph onnxruntime saved (None: names only), ``weights`` the kernels'
    time, used to pick which original node names a group.
    """
    mf = _ModelFile(model)
    weights = dict(weights or {})
    covered: dict[str, list[onnx.NodeProto]] = {}  # kernel -> model-file nodes
    method = "names"
    if optimized is not None:
        covered = _cover_by_tensors(mf, optimized, kernels)
        method = "optimized graph"
    for kernel in kernels:
        if kernel not in covered:
            node = _match_by_name(mf, kernel)
            if node is not None:
                covered[kernel] = [node]
    return _build_groups(mf, kernels, covered, weights, method)


def _cover_by_tensors(mf: _ModelFile, opt: onnx.ModelProto,
                      kernels: Mapping[str, str]) -> dict[str, list[onnx.NodeProto]]:
    g = opt.graph
    onodes = [n for n in g.node if n.name]
    oinit = {t.name for t in g.initializer}
    oproducer: dict[str, onnx.NodeProto] = {}
    oconsumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in onodes:
        for o in n.output:
            if o:
                oproducer[o] = n
        for i in n.input:
            if i:
                oconsumers[i].append(n)

    def equiv(t: str) -> str | None:
        if t in mf.tensors:
            return t
        p = oproducer.get(t)
        if p is not None and len(p.output) == 1 and p.name.endswith(_NCHWC_SUFFIX):
            base = p.name[: -len(_NCHWC_SUFFIX)]
            if base in mf.tensors:
                return base
        return None

    eq = {t: equiv(t) for t in set(oproducer) | set(oconsumers)}

    # Regions: kernels joined by tensors that have no counterpart in the model file.
    uf = _UnionFind()
    for n in onodes:
        uf.find(n.name)
    for t, p in oproducer.items():
        if eq.get(t) is None and t not in oinit:
            for c in oconsumers.get(t, []):
                uf.union(p.name, c.name)
    regions: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in onodes:
        regions[uf.find(n.name)].append(n)

    # Tensors that exist at run time bound every walk back through the model file.
    runtime = {e for t, e in eq.items() if e is not None and t in oproducer}
    runtime |= mf.inputs | mf.initializers | {t for t in oinit if t in mf.tensors}

    claims: dict[str, list[onnx.NodeProto]] = {}
    new_outputs: dict[str, set[str]] = {}
    for root, members in regions.items():
        outs: set[str] = set()
        for n in members:
            node_ins = {e for i in n.input if i and (e := eq.get(i))}
            outs |= {e for o in n.output if o and (e := eq.get(o)) and e not in node_ins}
        new_outputs[root] = outs
        claims[root] = _walk_back(mf, outs, runtime)

    # Indirectly reached nodes claimed by several regions were folded or shared: nobody's.
    owners: dict[str, int] = defaultdict(int)
    for nodes in claims.values():
        for node in nodes:
            owners[node.name] += 1
    for root, nodes in claims.items():
        outs = new_outputs[root]
        claims[root] = [n for n in nodes
                        if owners[n.name] == 1 or any(o in outs for o in n.output)]

    # Regions that add nothing (layout reorders, copies) go with a neighbour.
    producer_region = {e: uf.find(oproducer[t].name) for t, e in eq.items()
                       if e is not None and t in oproducer}
    for root, members in regions.items():
        if claims[root]:
            continue
        target = None
        for n in members:
            for i in n.input:
                if not i:
                    continue
                r = uf.find(oproducer[i].name) if i in oproducer else None
                if r is None or r == root:
                    r = producer_region.get(eq.get(i) or "")
                if r is not None and r != root and claims.get(r):
                    target = r
                    break
            if target:
                break
        if target is None:
            for n in members:
                for o in n.output:
                    for c in oconsumers.get(o, []):
                        r = uf.find(c.name)
                        if r != root and claims.get(r):
                            target = r
                            break
                    if target:
                        break
                if target:
                    break
        if target is not None:
            claims[root] = list(claims[target])

    covered: dict[str, list[onnx.NodeProto]] = {}
    for root, members in regions.items():
        if not claims[root]:
            continue
        split = _split_region(mf, members, claims[root], oproducer, oconsumers) \
            if len(members) > 1 else None
        for n in members:
            if n.name in kernels:
                covered[n.name] = split[n.name] if split else claims[root]
    return covered


def _split_region(mf: _ModelFile, members: list[onnx.NodeProto],
                  claimed: list[onnx.NodeProto],
                  oproducer: Mapping[str, onnx.NodeProto],
                  oconsumers: Mapping[str, list[onnx.NodeProto]],
                  ) -> dict[str, list[onnx.NodeProto]] | None:
    """Split a multi-kernel region when its kernels' names carry distinct nodes.

    A QDQ Conv followed by a MaxPool runs as ``conv0_token_1`` (QLinearConv), ``pool0_token_3``
    (NHWC MaxPool) and two Transposes joined by new tensors: one region, but two nodes the user
    can tell apart. Each covered node joins the last named kernel at or before it in the model's
    order; unnamed kernels (the Transposes) join the named kernel they feed or read from.
    """
    claimed_names = {n.name for n in claimed}
    seeds: dict[str, str] = {}
    for m in members:
        node = _match_by_name(mf, m.name)
        if node is not None and node.name in claimed_names and node.name not in seeds.values():
            seeds[m.name] = node.name
    if len(seeds) < 2:
        return None
    seed_pos = sorted((mf.position[v], k) for k, v in seeds.items())
    result: dict[str, list[onnx.NodeProto]] = {k: [] for k in seeds}
    for n in claimed:
        pos = mf.position.get(n.name, 0)
        owner = seed_pos[0][1]
        for sp, k in seed_pos:
            if sp <= pos:
                owner = k
        result[owner].append(n)
    pending = [m for m in members if m.name not in seeds]
    while pending:
        left = []
        for m in pending:
            target = next((oproducer[i].name for i in m.input
                           if i in oproducer and oproducer[i].name in result), None)
            if target is None:
                target = next((c.name for o in m.output for c in oconsumers.get(o, [])
                               if c.name in result), None)
            if target is None:
                left.append(m)
            else:
                result[m.name] = result[target]
        if len(left) == len(pending):
            for m in left:  # cannot place it: it covers the whole region (groups merge)
                result[m.name] = claimed
            break
        pending = left
    return result


def _walk_back(mf: _ModelFile, outs: set[str], runtime: set[str]) -> list[onnx.NodeProto]:
    found: dict[str, onnx.NodeProto] = {}
    stack = list(outs)
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = mf.producer.get(t)
        if node is None or node.name in found:
            continue
        if mf.is_constant_node(node) and t not in outs:
            continue
        found[node.name] = node
        for i in node.input:
            if i and i not in runtime:
                stack.append(i)
    return sorted(found.values(), key=lambda n: mf.position.get(n.name, 0))


def _match_by_name(mf: _ModelFile, kernel: str) -> onnx.NodeProto | None:
    candidates = [kernel]
    base = kernel[len("fused "):] if kernel.startswith("fused ") else kernel
    candidates.append(base)
    if "/" in base:
        candidates.append(base.split("/", 1)[0])
    for c in list(candidates):
        stripped = c
        while True:
            nxt = _NAME_SUFFIXES.sub("", stripped)
            if nxt == stripped or not nxt:
                break
            stripped = nxt
            candidates.append(stripped)
    for c in candidates:
        if c in mf.by_name:
            return mf.by_name[c]
        if c in mf.producer:
            return mf.producer[c]
    return None


def _build_groups(mf: _ModelFile, kernels: Mapping[str, str],
                  covered: Mapping[str, list[onnx.NodeProto]], weights: Mapping[str, float],
                  method: str) -> Attribution:
    # Kernels that share an original node are one group.
    uf = _UnionFind()
    origins_of: dict[str, list[str]] = {}
    for kernel, nodes in covered.items():
        names: list[str] = []
        for node in nodes:
            for o in mf.origins(node):
                if o not in names:
                    names.append(o)
        origins_of[kernel] = names
        uf.find("k:" + kernel)
        for o in names:
            uf.union("k:" + kernel, "o:" + o)
    by_root: dict[str, list[str]] = defaultdict(list)
    for kernel in kernels:
        if kernel in origins_of:
            by_root[uf.find("k:" + kernel)].append(kernel)
    groups: list[Group] = []
    kernel_group: dict[str, int] = {}
    for ks in by_root.values():
        ks.sort(key=lambda k: -weights.get(k, 0.0))
        # The node the heaviest nameable kernel stands for names the group.
        leads = [o for k in ks for o in _lead_origins(mf, k, kernels.get(k, ""), covered[k])]
        members = list(dict.fromkeys(leads + [o for k in ks for o in origins_of[k]]))
        fused = _fused_kernel(covered[ks[0]], kernels.get(ks[0], ""))
        if fused is not None:  # named after the kernel, not after one of the nodes it fused
            groups.append(Group(name=fused.name, op_type=fused.op_type,
                                members=[fused.name, *members], kernels=list(ks)))
        else:
            groups.append(Group(name=members[0], op_type=_op_type_of(mf, members[0],
                                                                       covered[ks[0]]),
                                members=members, kernels=list(ks)))
        for k in ks:
            kernel_group[k] = len(groups) - 1
    unattributed = [k for k in kernels if k not in kernel_group]
    return Attribution(groups, kernel_group, unattributed, method)


def _fused_kernel(nodes: list[onnx.NodeProto], op: str) -> onnx.NodeProto | None:
    """The node of the file a kernel runs that a pass fused from several (``fuse``: one
    GroupQueryAttention standing for 36 nodes of an attention block), if that is what it runs."""
    same_op = [n for n in nodes if n.op_type == op and len(get_origin(n)) > 1
               and n.domain not in ("", "ai.onnx")]
    return same_op[0] if len(same_op) == 1 else None


def _lead_origins(mf: _ModelFile, kernel: str, op: str,
                  nodes: list[onnx.NodeProto]) -> list[str]:
    """Origins of the covered node that best names a kernel: the one node of the kernel's op
    type, else the node its name carries (``fused mm0/MatMulAddFusion`` → mm0)."""
    same_op = [n for n in nodes if n.op_type == op]
    if len(same_op) == 1:  # an NCHWc Conv named after its Relu's output tensor is the Conv
        return get_origin(same_op[0])
    names = {n.name for n in nodes}
    base = kernel[len("fused "):] if kernel.startswith("fused ") else kernel
    for c in (kernel, base, base.split("/", 1)[0], _NAME_SUFFIXES.sub("", base.split("/", 1)[0])):
        if c in names:
            return get_origin(mf.by_name[c])
    return get_origin(same_op[0]) if same_op else []


def _op_type_of(mf: _ModelFile, original: str, nodes: list[onnx.NodeProto]) -> str:
    node = mf.by_name.get(original)
    if node is not None and get_origin(node) == [original]:
        return node.op_type
    # A rewritten node: the one carrying the original's name (mm0_quant, mm0_Q4,
    # mm0_lowrank_a) does its work; its helpers (x_QuantizeLinear, scale Muls) do not.
    mine = [n for n in nodes if original in get_origin(n)]
    named = [n for n in mine if n.name.startswith(original + "_")]
    if named:
        return min(named, key=lambda n: len(n.name)).op_type
    for n in mine:
        return n.op_type
    for n in mf.nodes:
        if original in get_origin(n):
            return n.op_type
    return nodes[0].op_type if nodes else ""
