"""Pass (session time, onnxruntime CPU): a LLaMA-family decoder's attention subgraph -> onnxruntime's
``com.microsoft.RotaryEmbedding`` (q and k) and ``com.microsoft.GroupQueryAttention``, per layer.

optimum exports transformers' eager attention as it runs in torch: per layer the q/k/v reshapes and
transposes, the rotary embedding of q and k (7 nodes each), the KV-cache Concats, ``repeat_kv`` for the
grouped k/v heads, QK^T, the scale, the mask, the softmax and its Casts, the product with V and the
transpose back, plus the shape arithmetic all of these need: most of the ~2,000 nodes a decode step
dispatches on SmolLM2, one at a time. The two contrib ops compute the same on q/k/v as the projections
return them (B, S, heads x D) and write the present k/v the graph returns. The exported file keeps the
standard ops, which TensorRT and every other runtime read; this pass rewrites only the graph an
onnxruntime CPU session is given (``sqz_export.ort_session``), the FP16 baseline's as well as model.onnx's.

Semantics are kept, padding included: GroupQueryAttention runs with ``causal=0`` and the graph's own
additive mask as ``attention_bias`` (the Add before the softmax), ``seqlens_k`` says every key position
is valid (total length - 1; the bias masks padding), and RotaryEmbedding rotates by the graph's
``position_ids``, so a left-padded batch rotates and masks as before. (GroupQueryAttention's own rotary,
``do_rotary``, counts positions from 0 in a prompt whatever ``position_ids`` say, so the keys it caches
for a padded sequence would be rotated by other positions than the graph's.) The rotary tables are the
graph's own: the subgraph that computes the cos and sin the layers multiply by is evaluated once, for
positions 0 .. ``max_positions`` - 1, and must be a function of ``position_ids`` alone (not of the
sequence length, as dynamic NTK scaling would be). What GroupQueryAttention refuses at run time it
refuses with an error, never a wrong answer: more than one new token per sequence after a cache in a
batch of several (``batch_size must be 1 when sequence_length > 1 and past context is given``).

Matched, from each Softmax back and forward: ``Softmax(Add(Mul(MatMul(q_rot, Transpose(k_rep)), scale),
bias))``, then Casts, ``MatMul(., v_rep)``, ``Transpose(0, 2, 1, 3)``, ``Reshape``; ``k_rep`` / ``v_rep`` the
present k/v (graph outputs, ``Concat(past, new)`` on the sequence axis) or their ``repeat_kv``
(Unsqueeze, Expand, Reshape); the new k/v and q ``Transpose(0, 2, 1, 3)(Reshape(projection))``, q and k
rotated as ``x * cos + rotate_half(x) * sin`` with the half-split rotation (``Concat(-x2, x1)``). Anything
else is refused with its reason and left as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graph_passes.base import GraphPass, PassResult, attributes, constant_tensors, consumers, ensure_opset

DOMAIN = "com.microsoft"
OP_TYPE = "GroupQueryAttention"
ROTARY_OP_TYPE = "RotaryEmbedding"
SEQUENCE_AXES = (2, -2)
"""The KV cache's sequence axis in BNSH, as the Concats may name it."""


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What the graph does not state in one place: the model config's head counts and rotary range."""

    num_heads: int
    kv_num_heads: int
    max_positions: int
    """Positions the rotary tables cover (the config's max_position_embeddings)."""


@dataclasses.dataclass
class AttentionMatch:
    softmax: str
    problem: str | None = None
    query: str = ""
    key: str = ""
    value: str = ""
    past_key: str = ""
    past_value: str = ""
    present_key: onnx.NodeProto | None = None
    present_value: onnx.NodeProto | None = None
    output: onnx.NodeProto | None = None
    """The Reshape whose output (B, S, H * D) o_proj reads: GroupQueryAttention's output takes its name."""
    bias: str = ""
    bias_slice: onnx.NodeProto | None = None
    """The Slice [..., :key length] the bias is, whose end the fused node's inputs must not take from
    the present k (it is the node's output): remade with the attention mask's length."""
    scale: float = 1.0
    cos: str = ""
    sin: str = ""
    head_dim: int = 0


class _Refused(Exception):
    """A candidate does not have the expected structure; the message says where."""


class GroupQueryAttentionPass(GraphPass[AttentionMatch]):
    """Counts the layers fused. Nodes left without readers stay in the graph: run ``CleanupPass``
    after it (which also sorts the few nodes appended)."""

    name = "group-query-attention"

    def __init__(
        self, shape: AttentionShape, position_ids: str = "position_ids", attention_mask: str = "attention_mask"
    ) -> None:
        self.shape = shape
        self.position_ids = position_ids
        self.attention_mask = attention_mask
        self._producers: dict[str, onnx.NodeProto] = {}
        self._readers: dict[str, list[onnx.NodeProto]] = {}
        self._constants: dict[str, np.ndarray] = {}
        self._model: onnx.ModelProto | None = None
        self._tables: dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | str] = {}
        """(cos, sin) -> their tables (max_positions, D / 2), or why they cannot be tabulated."""
        self._table_names: dict[tuple[str, str], tuple[str, str]] = {}
        self._lengths: tuple[str, str] | None = None

    # --- pattern / check ----------------------------------------------------------------------

    def pattern(self, model: onnx.ModelProto) -> Iterator[AttentionMatch]:
        graph = model.graph
        self._model = model
        self._producers = {name: node for node in graph.node for name in node.output}
        self._readers = consumers(graph)
        self._constants = {
            name: numpy_helper.to_array(tensor)
            for name, tensor in constant_tensors(graph).items()
            if tensor.data_location != TensorProto.EXTERNAL
        }
        inputs = {value.name: value for value in graph.input}
        outputs = {value.name for value in graph.output}
        for node in graph.node:
            if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
                match = AttentionMatch(node.name or node.output[0])
                try:
                    self._match(node, match, inputs, outputs)
                except _Refused as refused:
                    match.problem = str(refused)
                yield match

    def check(self, model: onnx.ModelProto, match: AttentionMatch) -> str | None:
        return match.problem

    def describe(self, match: AttentionMatch) -> str:
        return f"{match.softmax!r}"

    def _match(
        self,
        softmax: onnx.NodeProto,
        match: AttentionMatch,
        inputs: dict[str, onnx.ValueInfoProto],
        outputs: set[str],
    ) -> None:
        if self.position_ids not in inputs or self.attention_mask not in inputs:
            raise _Refused(f"the graph has no {self.position_ids!r} or {self.attention_mask!r} input")
        axis = attributes(softmax).get("axis", -1)
        if axis not in (-1, 3):
            raise _Refused(f"softmax over axis {axis}, not the key axis")
        masked_name = softmax.input[0]
        while masked_name in self._producers and self._producers[masked_name].op_type == "Cast":
            masked_name = self._producers[masked_name].input[0]
        masked = self._node(masked_name, "Add", "the softmax's input")
        scores, match.bias = self._split_operands(masked, ("Mul", "Div"), "the masked scores")
        scaled = self._producers[scores]
        product, scale = self._split_constant(scaled)
        match.scale = scale if scaled.op_type == "Mul" else 1.0 / scale
        qk = self._node(product, "MatMul", "the scaled scores")
        key_t = self._node(qk.input[1], "Transpose", "QK^T's right operand")
        if list(attributes(key_t).get("perm", [])) != [0, 1, 3, 2]:
            raise _Refused("k is not transposed (0, 1, 3, 2) for QK^T")
        match.present_key = self._cache_concat(key_t.input[0], outputs, "k")
        match.past_key = match.present_key.input[0]

        attended = self._sole_reader_after_casts(softmax.output[0])
        if attended.op_type != "MatMul" or attended.input[1] == "":
            raise _Refused(f"the softmax is read by {attended.op_type}, not the product with V")
        match.present_value = self._cache_concat(attended.input[1], outputs, "v")
        match.past_value = match.present_value.input[0]
        back = self._sole_reader(attended.output[0], "Transpose")
        if list(attributes(back).get("perm", [])) != [0, 2, 1, 3]:
            raise _Refused("the attention output is not transposed (0, 2, 1, 3) back")
        match.output = self._sole_reader(back.output[0], "Reshape")

        for past in (match.past_key, match.past_value):
            if past not in inputs:
                raise _Refused(f"the cache Concat's first input {past!r} is not a graph input")
        match.head_dim = _static_dim(inputs[match.past_key], 3)
        kv_heads = _static_dim(inputs[match.past_key], 1)
        if kv_heads != self.shape.kv_num_heads or match.head_dim <= 0 or match.head_dim % 2:
            raise _Refused(
                f"past key shape has {kv_heads} heads of size {match.head_dim}; the config says "
                f"{self.shape.kv_num_heads} heads (and an even head size is needed)"
            )
        match.value = self._projection(match.present_value.input[1], "v")
        key_rot = match.present_key.input[1]
        match.key, key_tables = self._rotary(key_rot, "k", match.head_dim)
        match.query, query_tables = self._rotary(qk.input[0], "q", match.head_dim)
        if key_tables != query_tables:
            raise _Refused("q and k are rotated by different tables")
        match.cos, match.sin = key_tables
        self._tabulate(match)
        sliced = self._producers.get(match.bias)
        # The key length the export slices the mask to is computed from the present k's shape.
        if sliced is not None and sliced.op_type == "Slice" and sliced.input[2] not in self._constants:
            if self._slice_is(sliced, 0, 0, end_at_least=True):
                match.bias_slice = sliced
        fused_inputs = [match.query, match.key, match.value, match.cos, match.sin]
        fused_inputs += list(match.bias_slice.input[:2]) if match.bias_slice is not None else [match.bias]
        produced = {match.output.output[0], match.present_key.output[0], match.present_value.output[0]}
        if self._reaches(fused_inputs, produced):
            raise _Refused("the attention's inputs depend on its outputs (the bias on the present k's length?)")

    def _reaches(self, names: list[str], targets: set[str]) -> bool:
        """Whether any of ``names`` is computed from one of ``targets``."""
        stack, seen = list(names), set()
        while stack:
            name = stack.pop()
            if name in targets:
                return True
            if name in seen or name not in self._producers:
                continue
            seen.add(name)
            stack.extend(self._producers[name].input)
        return False

    def _node(self, name: str, op_type: str, what: str) -> onnx.NodeProto:
        node = self._producers.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            found = "a graph input or initializer" if node is None else node.op_type
            raise _Refused(f"{what} comes from {found}, not {op_type}")
        return node

    def _split_operands(self, node: onnx.NodeProto, op_types: tuple[str, ...], what: str) -> tuple[str, str]:
        """(the operand produced by one of op_types, the other one) of a binary node."""
        for first, second in ((0, 1), (1, 0)):
            producer = self._producers.get(node.input[first])
            if producer is not None and producer.op_type in op_types:
                return node.input[first], node.input[second]
        raise _Refused(f"{what} has no {'/'.join(op_types)} operand")

    def _split_constant(self, node: onnx.NodeProto) -> tuple[str, float]:
        """(the variable operand, the scalar constant) of a Mul or Div by a constant."""
        positions = (0, 1) if node.op_type == "Mul" else (1,)
        for position in positions:
            value = self._constants.get(node.input[position])
            if value is not None and value.size == 1:
                return node.input[1 - position], float(value.reshape(()))
        raise _Refused(f"the scores' {node.op_type} is not by a scalar constant")

    def _sole_reader(self, name: str, op_type: str) -> onnx.NodeProto:
        readers = self._readers.get(name, [])
        if len(readers) != 1 or readers[0].op_type != op_type:
            raise _Refused(f"{name!r} is read by {[reader.op_type for reader in readers]}, not one {op_type}")
        return readers[0]

    def _sole_reader_after_casts(self, name: str) -> onnx.NodeProto:
        while True:
            readers = self._readers.get(name, [])
            if len(readers) != 1:
                raise _Refused(f"{name!r} has {len(readers)} readers, not one")
            if readers[0].op_type != "Cast":
                return readers[0]
            name = readers[0].output[0]

    def _cache_concat(self, name: str, outputs: set[str], which: str) -> onnx.NodeProto:
        """The Concat(past, new) on the sequence axis that ``name`` is (or repeat_kv repeats)."""
        while name not in outputs:
            node = self._producers.get(name)
            if node is None or node.op_type not in ("Reshape", "Expand", "Unsqueeze"):
                raise _Refused(f"{which} is neither a present {which} output nor its repeat_kv")
            name = node.input[0]
        concat = self._node(name, "Concat", f"present {which}")
        if len(concat.input) != 2 or attributes(concat).get("axis", 0) not in SEQUENCE_AXES:
            raise _Refused(f"present {which} is not Concat(past, new) on the sequence axis")
        return concat

    def _projection(self, name: str, which: str) -> str:
        """The projection output that ``name`` (BNSH) is the reshape and transpose of."""
        transpose = self._node(name, "Transpose", f"the new {which}")
        if list(attributes(transpose).get("perm", [])) != [0, 2, 1, 3]:
            raise _Refused(f"the new {which} is not transposed (0, 2, 1, 3) into heads")
        return self._node(transpose.input[0], "Reshape", f"the new {which}'s heads").input[0]

    def _rotary(self, name: str, which: str, head_dim: int) -> tuple[str, tuple[str, str]]:
        """(the projection output, (cos, sin)) of ``x * cos + rotate_half(x) * sin``."""
        added = self._node(name, "Add", f"rotated {which}")
        products = [self._node(operand, "Mul", f"a term of rotated {which}") for operand in added.input]
        for plain, rotated in ((products[0], products[1]), (products[1], products[0])):
            for x_position in (0, 1):
                x = plain.input[x_position]
                cos = plain.input[1 - x_position]
                for half_position in (0, 1):
                    if self._is_rotate_half(rotated.input[half_position], x, head_dim):
                        return self._projection(x, which), (cos, rotated.input[1 - half_position])
        raise _Refused(f"rotated {which} is not x * cos + rotate_half(x) * sin")

    def _is_rotate_half(self, name: str, x: str, head_dim: int) -> bool:
        """Whether ``name`` is Concat(-x[..., D/2:], x[..., :D/2]) on the last axis."""
        concat = self._producers.get(name)
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            return False
        if attributes(concat).get("axis", 0) not in (-1, 3):
            return False
        negated = self._producers.get(concat.input[0])
        if negated is None or negated.op_type != "Neg":
            return False
        upper, lower = self._producers.get(negated.input[0]), self._producers.get(concat.input[1])
        if upper is None or lower is None or upper.op_type != "Slice" or lower.op_type != "Slice":
            return False
        if upper.input[0] != x or lower.input[0] != x:
            return False
        half = head_dim // 2
        return self._slice_is(lower, 0, half, end_at_least=False) and self._slice_is(upper, half, head_dim, end_at_least=True)

    def _slice_is(self, node: onnx.NodeProto, start: int, end: int, end_at_least: bool) -> bool:
        """A Slice on the last axis, step 1, from ``start`` to ``end`` (or past it, for
        ``end_at_least``). A bound the graph computes (from the shape: the half) is taken as given."""
        if len(node.input) < 4:
            return False
        axes = self._constants.get(node.input[3])
        steps = self._constants.get(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1)
        if axes is None or axes.reshape(-1).tolist() not in ([3], [-1]) or steps is None or steps.reshape(-1).tolist() != [1]:
            return False
        lower = self._constants.get(node.input[1])
        upper = self._constants.get(node.input[2])
        if lower is not None and int(lower.reshape(-1)[0]) != start:
            return False
        if upper is not None and not (int(upper.reshape(-1)[0]) >= end if end_at_least else int(upper.reshape(-1)[0]) == end):
            return False
        return True

    # --- rewrite ------------------------------------------------------------------------------

    def rewrite(self, model: onnx.ModelProto, match: AttentionMatch) -> None:
        graph = model.graph
        assert match.output is not None and match.present_key is not None and match.present_value is not None
        cos_cache, sin_cache = self._table_initializers(graph, match)
        seqlens, total = self._sequence_lengths(graph)
        bias = match.bias
        if match.bias_slice is not None:
            sliced = match.bias_slice
            bias = f"{sliced.output[0]}/to_mask_length"
            ends = f"{OP_TYPE}/lengths/total_1d"
            graph.node.append(
                helper.make_node("Slice", [sliced.input[0], sliced.input[1], ends, *sliced.input[3:]], [bias], name=bias)
            )
        outputs = []
        for node in (match.output, match.present_key, match.present_value):
            outputs.append(node.output[0])
            node.output[0] = f"{node.output[0]}/unfused"  # left without readers, for CleanupPass
        rotated = []
        for label, projection in (("query", match.query), ("key", match.key)):
            name = f"{match.softmax}/{ROTARY_OP_TYPE}/{label}"
            heads = self.shape.num_heads if label == "query" else self.shape.kv_num_heads
            graph.node.append(
                helper.make_node(
                    ROTARY_OP_TYPE, [projection, self.position_ids, cos_cache, sin_cache], [name], name=name,
                    domain=DOMAIN, num_heads=heads, interleaved=0,
                )
            )
            rotated.append(name)
        graph.node.append(
            helper.make_node(
                OP_TYPE,
                [*rotated, match.value, match.past_key, match.past_value, seqlens, total, "", "", "", bias],
                outputs,
                name=f"{match.softmax}/{OP_TYPE}",
                domain=DOMAIN,
                num_heads=self.shape.num_heads,
                kv_num_heads=self.shape.kv_num_heads,
                scale=match.scale,
                causal=0,
            )
        )

    def finish(self, model: onnx.ModelProto, result: PassResult) -> None:
        if result.count:
            ensure_opset(model, DOMAIN)

    def _sequence_lengths(self, graph: onnx.GraphProto) -> tuple[str, str]:
        """(seqlens_k, total_sequence_length), built once: every key position is valid (the bias masks)."""
        if self._lengths is None:
            prefix = f"{OP_TYPE}/lengths"
            graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array([0], np.int64), f"{prefix}/batch_axis"),
                    numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/length_axis"),
                    numpy_helper.from_array(np.array(1, np.int32), f"{prefix}/one"),
                ]
            )
            graph.node.extend(
                [
                    helper.make_node("Shape", [self.attention_mask], [f"{prefix}/shape"], name=f"{prefix}/shape"),
                    helper.make_node("Gather", [f"{prefix}/shape", f"{prefix}/length_axis"], [f"{prefix}/total_1d"], name=f"{prefix}/total_1d", axis=0),
                    helper.make_node("Squeeze", [f"{prefix}/total_1d"], [f"{prefix}/total64"], name=f"{prefix}/total64"),
                    helper.make_node("Cast", [f"{prefix}/total64"], [f"{prefix}/total"], name=f"{prefix}/total", to=TensorProto.INT32),
                    helper.make_node("Sub", [f"{prefix}/total", f"{prefix}/one"], [f"{prefix}/last"], name=f"{prefix}/last"),
                    helper.make_node("Gather", [f"{prefix}/shape", f"{prefix}/batch_axis"], [f"{prefix}/batch_shape"], name=f"{prefix}/batch_shape", axis=0),
                    helper.make_node("Expand", [f"{prefix}/last", f"{prefix}/batch_shape"], [f"{prefix}/seqlens"], name=f"{prefix}/seqlens"),
                ]
            )
            self._lengths = (f"{prefix}/seqlens", f"{prefix}/total")
        return self._lengths

    def _tabulate(self, match: AttentionMatch) -> None:
        """Evaluates the graph's cos and sin for positions 0 .. max_positions - 1 (once per pair)."""
        assert self._model is not None
        key = (match.cos, match.sin)
        if key not in self._tables:
            positions = np.arange(self.shape.max_positions, dtype=np.int64)[None]
            try:
                values = _evaluate(self._model, [match.cos, match.sin], {self.position_ids: positions})
                self._tables[key] = _half_tables(values, match.head_dim)
            except Exception as exc:  # noqa: BLE001  (onnxruntime's own errors as well as ours)
                self._tables[key] = f"the rotary tables cannot be computed from {self.position_ids!r} alone: {exc}"
        tables = self._tables[key]
        if isinstance(tables, str):
            raise _Refused(tables)

    def _table_initializers(self, graph: onnx.GraphProto, match: AttentionMatch) -> tuple[str, str]:
        """The initializers of a pair's tables, added to the graph once."""
        key = (match.cos, match.sin)
        if key not in self._table_names:
            tables = self._tables[key]
            assert not isinstance(tables, str)
            names = (f"{ROTARY_OP_TYPE}/cos_cache/{len(self._table_names)}", f"{ROTARY_OP_TYPE}/sin_cache/{len(self._table_names)}")
            graph.initializer.extend(numpy_helper.from_array(table, name) for table, name in zip(tables, names, strict=True))
            self._table_names[key] = names
        return self._table_names[key]


def _half_tables(values: list[np.ndarray], head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The first halves of cos and sin evaluated as (1, 1, positions, D): what RotaryEmbedding takes,
    since the half-split rotation repeats each frequency in both halves."""
    half = head_dim // 2
    tables = []
    for label, table in zip(("cos", "sin"), values, strict=True):
        if table.ndim != 4 or table.shape[:2] != (1, 1) or table.shape[3] != head_dim:
            raise ValueError(f"{label} has shape {table.shape}, expected (1, 1, positions, {head_dim})")
        rows = table[0, 0]
        if not np.array_equal(rows[:, :half], rows[:, half:]):
            raise ValueError(f"{label} is not two equal halves (partial or interleaved rotary)")
        tables.append(np.ascontiguousarray(rows[:, :half]))
    return tables[0], tables[1]


def _static_dim(value: onnx.ValueInfoProto, axis: int) -> int:
    dims = value.type.tensor_type.shape.dim
    return dims[axis].dim_value if len(dims) > axis and dims[axis].HasField("dim_value") else 0


def _evaluate(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Values of ``names`` given ``feeds``, computed by onnxruntime on the subgraph that produces them.

    Raises:
        ValueError: they depend on a graph input not in ``feeds`` or on external tensor data.
    """
    import onnxruntime as ort

    graph = model.graph
    producers = {name: index for index, node in enumerate(graph.node) for name in node.output}
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {value.name: value for value in graph.input}
    needed: set[int] = set()
    seen: set[str] = set()
    used_inits: dict[str, onnx.TensorProto] = {}
    stack = list(names)
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in feeds:
            continue
        if name in initializers:
            if initializers[name].data_location == TensorProto.EXTERNAL:
                raise ValueError(f"{name!r} is external data")
            used_inits[name] = initializers[name]
            continue
        if name in graph_inputs or name not in producers:
            raise ValueError(f"{names} depend on {name!r}, which is not among {sorted(feeds)}")
        needed.add(producers[name])
        stack.extend(graph.node[producers[name]].input)
    sub = helper.make_graph(
        [graph.node[index] for index in sorted(needed)],
        "evaluate",
        [graph_inputs[name] for name in feeds],
        [onnx.ValueInfoProto(name=name) for name in names],
        list(used_inits.values()),
    )
    submodel = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    session = ort.InferenceSession(submodel.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, feeds)
