"""Lower a Q/DQ graph to ONNX Runtime's CPU integer kernels, for the fast INT8 recipes.

ORT turns ``DequantizeLinear -> MatMul <- DequantizeLinear(int8 weight)`` into its
``MatMulIntegerToFloat`` kernel when it loads a Q/DQ model, but it leaves the bias ``Add`` that
follows as a separate pass over the activations, and on this kind of model that Add costs about
as much as a twelfth of the integer GEMM itself. Writing the integer node ourselves lets the bias
ride in the GEMM's output stage (MLAS adds it while scaling the int32 accumulators), which is the
same arithmetic: outputs match the Q/DQ graph run by ORT to float rounding. Residual adds
before a LayerNorm become ``Sum`` so that ORT keeps them out of its slower fused
SkipLayerNormalization kernel (``residual_adds_as_sum``).

The result uses ``com.microsoft`` contrib ops, so it runs in ONNX Runtime only; the recipes that
ask for it (``export.ort_cpu_kernels``) already target ORT's fused attention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

MS_DOMAIN = "com.microsoft"


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _scalar_like(init: onnx.TensorProto | None) -> bool:
    return init is not None and int(np.prod(init.dims)) == 1


def lower_integer_matmuls(model: onnx.ModelProto, only: set[str] | None = None) -> int:
    """Rewrite in place every ``DQ(activation) @ DQ(int8 weight) [+ bias]`` into one
    ``com.microsoft::MatMulIntegerToFloat`` with the bias folded in; returns how many.

    Only the exact pattern ORT itself would fuse is touched: a per-tensor activation scale, an
    int8 weight initializer dequantized per output column (axis 1) or per tensor, and a 1-D float
    bias initializer of the output width. Anything else (int4 weights, per-row scales, a MatMul
    between two activations) is left as it is. ``only``: output names of the MatMuls to touch
    (``ort_fused_matmuls``), so that nothing runs integer that ORT would have run in float.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    removed: set[int] = set()
    replacements: dict[int, onnx.NodeProto] = {}
    count = 0

    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or \
                (only is not None and node.output[0] not in only):
            continue
        a_dq, b_dq = (producer.get(name) for name in node.input)
        if a_dq is None or b_dq is None or a_dq.op_type != "DequantizeLinear" or \
                b_dq.op_type != "DequantizeLinear":
            continue
        w = inits.get(b_dq.input[0])
        if w is None or w.data_type != onnx.TensorProto.INT8 or len(w.dims) != 2:
            continue
        b_axis = next((a.i for a in b_dq.attribute if a.name == "axis"), 1)
        w_scale = inits.get(b_dq.input[1])
        w_zp = inits.get(b_dq.input[2]) if len(b_dq.input) > 2 else None
        if w_scale is None or not (_scalar_like(w_scale) or (b_axis == 1 and
                                                              list(w_scale.dims) == [w.dims[1]])):
            continue
        a_scale = inits.get(a_dq.input[1])
        a_zp = inits.get(a_dq.input[2]) if len(a_dq.input) > 2 else None
        if not _scalar_like(a_scale) or (len(a_dq.input) > 2 and not _scalar_like(a_zp)):
            continue

        out_name, bias = node.output[0], ""
        users = consumers.get(out_name, [])
        if len(users) == 1 and users[0].op_type == "Add" and out_name not in outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == out_name else add.input[0]
            b = inits.get(other)
            if b is not None and b.data_type == onnx.TensorProto.FLOAT and \
                    list(b.dims) == [w.dims[1]]:
                bias, out_name = other, add.output[0]
                removed.add(id(add))

        zp_w = b_dq.input[2] if w_zp is not None else ""
        if zp_w and w_zp.data_type != onnx.TensorProto.INT8:
            continue
        inputs = [a_dq.input[0], b_dq.input[0], a_dq.input[1], b_dq.input[1],
                  a_dq.input[2] if len(a_dq.input) > 2 else "", zp_w, bias]
        while inputs and not inputs[-1]:
            inputs.pop()
        replacements[id(node)] = onnx.helper.make_node(
            "MatMulIntegerToFloat", inputs, [out_name], domain=MS_DOMAIN,
            name=(node.name or out_name) + "/int8")
        count += 1

    if not count:
        return 0
    new_nodes = [replacements.get(id(n), n) for n in graph.node if id(n) not in removed]
    # Dequantize nodes that no longer feed anything go too (their inputs stay: they are the
    # quantized tensors the integer node now reads).
    live = {name for n in new_nodes for name in n.input} | outputs
    new_nodes = [n for n in new_nodes
                 if not (n.op_type == "DequantizeLinear" and n.output[0] not in live)]
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    _drop_unused_initializers(graph)
    return count


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _init_array(inits: dict, name: str) -> np.ndarray | None:
    t = inits.get(name)
    return None if t is None else numpy_helper.to_array(t)


def _slice_range(node: onnx.NodeProto, inits: dict) -> tuple[int, int] | None:
    """(start, end) of a Slice on the last axis with constant bounds and step 1, else None."""
    vals = [_init_array(inits, n) if n else None for n in list(node.input[1:]) + [""] * 4][:4]
    starts, ends, axes, steps = vals
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and int(axes.reshape(-1)[0]) not in (-1, 2):
        return None
    if steps is not None and int(steps.reshape(-1)[0]) != 1:
        return None
    return int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])


def _mask_source(graph: onnx.GraphProto, name: str, producer: dict) -> str | None:
    """The graph input an additive attention bias is computed from, when its values depend on
    exactly one input (the padding mask); inputs reached only through ``Shape`` (sizes, not
    values) do not count. Whether the bias really is a padding mask is checked afterwards by the
    export's ORT-vs-torch parity on padded batches."""
    inputs = {i.name for i in graph.input}
    found, stack, seen = set(), [name], set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in inputs:
            found.add(t)
            continue
        node = producer.get(t)
        if node is None or node.op_type == "Shape":
            continue  # an initializer, or only the size of something
        if node.op_type in ("MatMul", "Gemm", "MatMulIntegerToFloat", "LayerNormalization",
                            "Softmax", "MultiHeadAttention", "QAttention"):
            return None  # computed from hidden states: not a padding mask
        stack.extend(node.input)
    return found.pop() if len(found) == 1 else None


def lower_attention(model: onnx.ModelProto) -> int:
    """Rewrite the q/k/v projections + ``MultiHeadAttention`` of each layer into one
    ``com.microsoft::QAttention`` (one integer GEMM for q, k and v, no split, bias inside);
    returns how many. Runs after ``lower_integer_matmuls``.

    Two shapes are recognised: one projection whose output is sliced into thirds (timm ``qkv``)
    and three projections of the same quantized input (BERT query/key/value). An additive
    padding bias computed only from one graph input becomes QAttention's raw 0/1 mask.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    removed: set[int] = set()
    replacements: dict[int, onnx.NodeProto] = {}
    new_inits: list[onnx.TensorProto] = []
    mask_casts: dict[str, str] = {}
    extra_nodes: list[onnx.NodeProto] = []
    count = 0

    def proj_parts(mm: onnx.NodeProto):
        if mm is None or mm.op_type != "MatMulIntegerToFloat" or len(mm.input) != 7:
            return None
        w, ws = _init_array(inits, mm.input[1]), _init_array(inits, mm.input[3])
        wz = _init_array(inits, mm.input[5]) if mm.input[5] else None
        b = _init_array(inits, mm.input[6])
        if w is None or ws is None or b is None:
            return None
        n = w.shape[1]
        ws = np.broadcast_to(ws.reshape(-1), (n,)) if ws.size == 1 else ws
        wz = np.zeros(n, np.int8) if wz is None else np.broadcast_to(wz.reshape(-1), (n,))
        return w, ws, wz, b

    for node in graph.node:
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN:
            continue
        ins = list(node.input) + [""] * 8
        if ins[3] or ins[4] or any(ins[6:]):
            continue
        q, k, v = (producer.get(t) for t in ins[:3])
        parts = None
        if q is not None and q.op_type == "Slice" and all(
                p is not None and p.op_type == "Slice" and p.input[0] == q.input[0]
                for p in (k, v)):
            mm = producer.get(q.input[0])
            got = proj_parts(mm)
            ranges = [_slice_range(p, inits) for p in (q, k, v)]
            if got is not None and None not in ranges:
                n = got[0].shape[1]
                ranges = [(start, min(end, n)) for start, end in ranges]
                third = n // 3
                if n % 3 == 0 and ranges == [(0, third), (third, 2 * third), (2 * third, n)] and \
                        len(consumers.get(mm.output[0], [])) == 3:
                    parts, mms, dead = got, [mm], [q, k, v, mm]
        elif all(p is not None and p.op_type == "MatMulIntegerToFloat" for p in (q, k, v)):
            mms = [q, k, v]
            same_input = all(m.input[0] == q.input[0] and m.input[2] == q.input[2] and
                             m.input[4] == q.input[4] for m in mms)
            got = [proj_parts(m) for m in mms]
            single_use = all(len(consumers.get(m.output[0], [])) == 1 for m in mms)
            if same_input and single_use and None not in got and \
                    len({g[0].shape[1] for g in got}) == 1:
                parts = tuple(np.concatenate([g[i] for g in got], axis=-1) for i in range(4))
                dead = mms
        if parts is None:
            continue
        mask = ""
        if ins[5]:
            src = _mask_source(graph, ins[5], producer)
            if src is None:
                continue
            if src not in mask_casts:
                mask_casts[src] = src + "/int32"
                extra_nodes.append(onnx.helper.make_node(
                    "Cast", [src], [mask_casts[src]], to=onnx.TensorProto.INT32,
                    name=src + "/cast_int32"))
            mask = mask_casts[src]
        w, ws, wz, b = parts
        prefix = (node.name or node.output[0]) + "/qattention"
        for suffix, arr in (("weight", w), ("weight_scale", ws), ("weight_zero_point", wz),
                            ("bias", b)):
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(arr),
                                                     f"{prefix}.{suffix}"))
        first = mms[0]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        replacements[id(node)] = onnx.helper.make_node(
            "QAttention", [first.input[0], f"{prefix}.weight", f"{prefix}.bias", first.input[2],
                           f"{prefix}.weight_scale", mask, first.input[4],
                           f"{prefix}.weight_zero_point"],
            [node.output[0]], domain=MS_DOMAIN, name=prefix,
            **{k: attrs[k] for k in ("num_heads", "scale") if k in attrs})
        removed.update(id(d) for d in dead)
        count += 1

    if not count:
        return 0
    nodes = extra_nodes + [replacements.get(id(n), n) for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    return count


def residual_adds_as_sum(model: onnx.ModelProto) -> int:
    """Rewrite in place each residual ``Add`` (two activations) that feeds a LayerNormalization
    as the identical ``Sum``; returns how many.

    ORT fuses ``Add -> LayerNormalization`` into ``SkipLayerNormalization`` when it loads a
    model, and on the CPU that kernel is slower than the two ops it replaces. In the lowered
    post-LN BERT graph (MiniLM b32, 2 threads, Xeon with AMX) the fused kernel made the whole
    model 11% slower (195 vs 174 ms); the fp32 graph loses about 4% the same way. ``Sum`` is
    the same arithmetic, and ORT's fusion only matches ``Add``.
    """
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    consumers = _consumers(graph)
    count = 0
    for node in graph.node:
        if node.op_type == "Add" and node.domain in ("", "ai.onnx") and \
                not any(name in inits for name in node.input) and \
                any(c.op_type == "LayerNormalization" for c in consumers.get(node.output[0], [])):
            node.op_type = "Sum"
            count += 1
    return count


EMBEDDING_KERNELS = ("gather_block_quantized", "gather_dequantize")
# Tables smaller than this stay fp32: they save almost nothing, and BERT's 2-row token-type table
# has one outlier column (row max / mean |x| about 30), so per-row int8 flattens the rest of a row
# that is added to every token. On all-MiniLM-L6-v2 (fast INT8, 256 eval sentences) int8 token
# types alone cost 0.00014 cosine, the 30522-row word table 0.00002, the 512-row position table
# 0.00004.
MIN_EMBEDDING_ELEMENTS = 1 << 16


def per_row_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes in [-127, 127] and one fp32 scale per row (max |row| / 127)."""
    rows = rows.astype(np.float32)
    scale = np.abs(rows).max(axis=1, keepdims=True) / np.float32(127.0)
    scale[scale == 0] = 1.0  # an all-zero row (padding id): any scale gives zeros back
    return np.clip(np.rint(rows / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def round_embedding_tables(module, min_elements: int = MIN_EMBEDDING_ELEMENTS) -> int:
    """Put the weight of every ``torch.nn.Embedding`` of at least ``min_elements`` values on the
    per-row int8 grid that ``quantize_embedding_tables`` stores, in place; returns how many.

    Run before export when the tables will be int8: the torch model that the export's parity
    check and the report compare against then computes what ORT computes, and the later int8
    rewrite of the exported tables is exact (values already on the grid give the same codes)."""
    import torch

    count = 0
    for emb in module.modules():
        if isinstance(emb, torch.nn.Embedding) and emb.weight.numel() >= min_elements:
            codes, scale = per_row_int8(emb.weight.detach().cpu().float().numpy())
            with torch.no_grad():
                emb.weight.copy_(torch.from_numpy(codes.astype(np.float32) * scale))
            count += 1
    return count


def quantize_embedding_tables(model: onnx.ModelProto, kernel: str = "gather_block_quantized",
                              min_elements: int = MIN_EMBEDDING_ELEMENTS) -> int:
    """Store each float lookup table of at least ``min_elements`` read by a ``Gather`` (BERT's
    word and position embeddings) as int8 codes with one fp32 scale per row, in place; returns
    how many tables.

    Only the gathered rows are dequantized, after the lookup, so the cost is per token, not per
    vocabulary entry. ``kernel``: ``gather_block_quantized`` writes one
    ``com.microsoft::GatherBlockQuantized`` (uint8 codes around its default zero point 128,
    8 bits, one block spanning the row); ``gather_dequantize`` writes standard ops (Gather of
    the int8 codes and of the scales, Cast, Mul). Symmetric codes in [-127, 127]: the word
    table of all-MiniLM-L6-v2 (30522 x 384) goes from 46.9 MB to 11.8 MB.

    A table is left alone when its first Gather has constant indices (ORT folds that lookup)
    or gathers along another axis, or when anything other than a Gather reads it (a weight tied
    to a MatMul); ViTs have no such lookup (their position embedding is added, not gathered)."""
    if kernel not in EMBEDDING_KERNELS:
        raise ValueError(f"kernel must be one of {EMBEDDING_KERNELS}, got {kernel!r}")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    new_inits: list[onnx.TensorProto] = []
    replacements: dict[int, list[onnx.NodeProto]] = {}
    done: set[str] = set()
    for node in graph.node:
        table = inits.get(node.input[0]) if node.input else None
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or table is None or \
                table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 or \
                node.input[1] in inits or table.name in done or \
                int(np.prod(table.dims)) < min_elements or \
                next((a.i for a in node.attribute if a.name == "axis"), 0) != 0 or \
                any(c.op_type != "Gather" for c in consumers[table.name]):
            continue
        codes, scale = per_row_int8(numpy_helper.to_array(table))
        name = table.name
        if kernel == "gather_block_quantized":
            # One block per row: the block size is a power of two >= 16 (the kernel's rule) that
            # covers the row, so there is one scale per row (scales are [rows, ceil(D / block)]).
            block = max(16, 1 << (int(table.dims[1]) - 1).bit_length())
            new_inits += [numpy_helper.from_array((codes.astype(np.int16) + 128).astype(np.uint8),
                                                  name + "/uint8"),
                          numpy_helper.from_array(scale.astype(np.float32), name + "/scale")]
        else:
            new_inits += [numpy_helper.from_array(codes, name + "/int8"),
                          numpy_helper.from_array(scale.astype(np.float32), name + "/scale")]
        for user in consumers[name]:
            out, idx = user.output[0], user.input[1]
            base = user.name or out
            if kernel == "gather_block_quantized":
                replacements[id(user)] = [onnx.helper.make_node(
                    "GatherBlockQuantized", [name + "/uint8", idx, name + "/scale"], [out],
                    domain=MS_DOMAIN, name=base + "/int8", bits=8, block_size=block,
                    gather_axis=0, quantize_axis=1)]
            else:
                replacements[id(user)] = [
                    onnx.helper.make_node("Gather", [name + "/int8", idx], [out + "/int8"],
                                          name=base + "/int8"),
                    onnx.helper.make_node("Gather", [name + "/scale", idx], [out + "/scale"],
                                          name=base + "/scale"),
                    onnx.helper.make_node("Cast", [out + "/int8"], [out + "/float"],
                                          to=onnx.TensorProto.FLOAT, name=base + "/cast"),
                    onnx.helper.make_node("Mul", [out + "/float", out + "/scale"], [out],
                                          name=base + "/dequantize")]
        done.add(name)
    if not done:
        return 0
    nodes = [new for n in graph.node for new in replacements.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    if kernel == "gather_block_quantized" and \
            not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    _drop_unused_initializers(graph)
    return len(done)


def ort_optimized_graph(model: onnx.ModelProto) -> onnx.GraphProto:
    """The graph ONNX Runtime runs for ``model`` on the CPU after its own fusions (extended
    level: Q/DQ, attention and LayerNorm fusions; no layout changes)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath, load_external_data=False).graph


def ort_fused_matmuls(model: onnx.ModelProto) -> set[str]:
    """Output names of the MatMuls ONNX Runtime itself turns into integer kernels when it loads
    ``model`` (its Q/DQ fusion skips, for instance, 2-D MatMuls it folds into a float Gemm)."""
    return {n.output[0] for n in ort_optimized_graph(model).node
            if n.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul")}


def lower_file(path: Path, *, int8_embeddings: bool = False) -> dict[str, int]:
    """Lower ``path`` in place; returns how many MatMuls, attention blocks and residual adds
    were rewritten (and, with ``int8_embeddings``, how many lookup tables became int8)."""
    model = onnx.load(str(path))
    done = {"matmuls": lower_integer_matmuls(model, only=ort_fused_matmuls(model))}
    done["attention"] = lower_attention(model)
    done["residual_sums"] = residual_adds_as_sum(model)
    if int8_embeddings:
        done["int8_embeddings"] = quantize_embedding_tables(model)
    if any(done.values()):
        external = model.ByteSize() > (1 << 30)
        onnx.save(model, str(path), save_as_external_data=external,
                  location=path.name + ".data")
    return done
