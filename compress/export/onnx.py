"""Torch -> ONNX with the dynamo exporter, dynamic batch (and sequence) axes, checked.

Rules learned the hard way (see docs/onnx-notes in the reference): token counts must come from
integer ops on shapes, ``scatter_reduce(mean)`` must never reach the exporter, and ORT parity is
checked at several shapes, not only the traced one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import ExportError
from ..models.handle import ModelHandle

log = logging.getLogger(__name__)
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of parameters above which weights go to a side file


def _param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


EXPORTERS = ("dynamo", "torchscript")


def export_onnx(handle: ModelHandle, path: Path, *, opset: int = 21,
                external_data: str = "auto", slim: bool = True,
                exporters: tuple[str, ...] = EXPORTERS) -> Path:
    """Export ``handle.module`` (eval mode, CPU) to ``path``; returns the path. ``slim``: drop
    what ORT never reads (``slim_proto``); off, only the exporter's stack traces are removed.

    Tries ``exporters`` in order: torch.export (dynamo) first, then the TorchScript tracer
    (``dynamo=False``) where torch.export cannot capture the model (data-dependent control
    flow, unsupported ops). Which one produced the file, and why the others failed, is left in
    ``handle.info["export"]`` for the report."""
    module = handle.module
    module.eval()
    use_external = external_data == "always" or (
        external_data == "auto" and _param_bytes(module) > EXTERNAL_DATA_THRESHOLD)
    path.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for exporter in exporters:
        try:
            _export_with(exporter, handle, path, opset, use_external)
        except Exception as e:  # noqa: BLE001 - the exporters raise many types
            first = (str(e).strip().splitlines() or [""])[0][:300]
            failures.append(f"{exporter}: {type(e).__name__}: {first}")
            log.info("ONNX export of %s with the %s exporter failed: %s", handle.name, exporter,
                     failures[-1])
            continue
        handle.info.setdefault("export", {})[path.name] = {
            "exporter": exporter, "failed": failures}
        break
    else:
        raise ExportError(f"ONNX export of {handle.name} failed with every exporter: "
                          + "; ".join(failures))
    if slim:
        slim_onnx(path)
    else:
        _strip_node_metadata(path)
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported {path.name} fails onnx.checker: {str(e)[:500]}") from e
    return path


def exporter_used(handle: ModelHandle, path: Path) -> dict | None:
    """``{"exporter": "dynamo" | "torchscript", "failed": [...]}`` for a file export_onnx wrote."""
    return handle.info.get("export", {}).get(path.name)


def _export_with(exporter: str, handle: ModelHandle, path: Path, opset: int,
                 use_external: bool) -> None:
    module = handle.module
    example = handle.example_inputs(batch_size=2, seq_len=16)
    args = tuple(example[n].to(handle.device) for n in handle.input_names)
    text = handle.task == "text-embedding"
    # The exporter prints progress lines to stdout; keep them in the log instead.
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=4096)
                if text:
                    seq = torch.export.Dim("sequence", min=2, max=handle.max_positions)
                    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
                else:
                    dynamic_shapes = ({0: batch},)
                program = torch.onnx.export(
                    module, args, dynamo=True, opset_version=opset,
                    input_names=list(handle.input_names), output_names=[handle.output_name],
                    dynamic_shapes=dynamic_shapes, external_data=use_external, verbose=False,
                    report=False)
                program.save(str(path), external_data=use_external)
            else:
                axes = {0: "batch", 1: "sequence"} if text else {0: "batch"}
                dynamic_axes = dict.fromkeys(handle.input_names, axes)
                dynamic_axes[handle.output_name] = {0: "batch"}
                # The TorchScript exporter supports opsets up to 20; QDQ and the ops used here
                # exist there with the same semantics.
                torch.onnx.export(module, args, str(path), dynamo=False,
                                  opset_version=min(opset, 20),
                                  input_names=list(handle.input_names),
                                  output_names=[handle.output_name], dynamic_axes=dynamic_axes)
    finally:
        log.debug("exporter output:\n%s", captured.getvalue())


def slim_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop what ONNX Runtime never reads, in place: ``value_info`` of initializers (their
    shapes are in the tensors), the exported program's graph signature, metadata on nodes and
    value_info (the dynamo exporter's stack
    traces, class lists, module-path scopes and graph-signature tags; nothing in compress maps
    nodes back through them) and doc strings. Kept: node names (``ort_quantize``'s
    ``nodes_to_exclude`` and ORT's quantization tools address nodes by name) and the
    intermediate value_info, whose symbolic dims ("batch") ORT's own shape inference cannot
    recover and its fusions compare (without them one SkipLayerNormalization fusion is lost on
    a ViT and outputs move by 1e-8). Outputs are bit-identical (tests/export/test_onnx.py)."""
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        constants = {t.name for t in g.initializer}
        keep = [v for v in g.value_info if v.name not in constants]
        del g.value_info[:]
        for v in keep:
            del v.metadata_props[:]
            v.doc_string = ""
        g.value_info.extend(keep)
        g.doc_string = ""
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
            # Control-flow subgraphs (If/Loop/Scan) carry their own value_info.
            graphs += [a.g for a in node.attribute if a.HasField("g")]
            for a in node.attribute:
                graphs += list(a.graphs)
        for t in list(g.input) + list(g.output):
            t.doc_string = ""
    proto.doc_string = ""
    # torch.export's graph signature (input/output kinds of the ExportedProgram; 13 kB on MiniLM
    # fp32, 25 kB with quantized weights): nothing reads it back from an ONNX file.
    keep = [p for p in proto.graph.metadata_props if not p.key.startswith("pkg.torch.export.")]
    del proto.graph.metadata_props[:]
    proto.graph.metadata_props.extend(keep)
    drop_default_zero_points(proto)
    pack_block_dequantize_weights(proto)
    return proto


def input_use_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs read each tensor name (an initializer read once can be rewritten)."""
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    return uses


def pack_block_dequantize_weights(proto: onnx.ModelProto) -> int:
    """Store the 8-bit containers of blocked ``DequantizeLinear`` weights (``NBitsConv2d``)
    as UINT4 where every code and zero point fits in 4 bits: half the bytes, same values
    (ORT reads UINT4 blocked DequantizeLinear since opset 21). Returns how many."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    users = input_use_counts(proto)
    packed = 0
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or \
                not any(a.name == "block_size" for a in node.attribute):
            continue
        data, zp = inits.get(node.input[0]), inits.get(node.input[2])
        if data is None or zp is None or data.data_type != onnx.TensorProto.UINT8 or \
                zp.data_type != onnx.TensorProto.UINT8 or users[data.name] != 1 or \
                users[zp.name] != 1:
            continue
        codes, zeros = numpy_helper.to_array(data), numpy_helper.to_array(zp)
        if codes.max(initial=0) > 15 or zeros.max(initial=0) > 15:
            continue
        for t, values in ((data, codes), (zp, zeros)):
            flat = values.astype(np.uint8).ravel()
            if flat.size % 2:
                flat = np.append(flat, np.uint8(0))
            raw = (flat[0::2] & 0xF) | (flat[1::2] << 4)   # low nibble first (ONNX int4)
            t.CopyFrom(onnx.helper.make_tensor(t.name, onnx.TensorProto.UINT4,
                                               list(values.shape), raw.tobytes(), raw=True))
        packed += 1
    return packed


def drop_default_zero_points(proto: onnx.ModelProto) -> int:
    """Remove MatMulNBits / GatherBlockQuantized zero points that equal the default, 2^(bits-1) in
    every block (symmetric quantization): ORT substitutes the same value, so outputs do not
    change and the file loses half a byte per 4-bit block. Returns how many were dropped."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    uses = input_use_counts(proto)
    dropped = 0
    for node in proto.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized") or \
                len(node.input) < 4 or node.input[3] not in inits:
            continue
        # GatherBlockQuantized on uint8 data also defaults to 2^(bits-1) (checked bit-identical
        # on MiniLM's 4-bit embeddings, ORT 1.32).
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        zp = numpy_helper.to_array(inits[node.input[3]])
        if zp.dtype.kind != "u" or zp.itemsize != 1:
            continue   # float zero points (HQQ) have no default
        if zp.size == 0 or node.input[2] not in inits:
            continue
        # One code per block, packed low bits first; a row's last byte may hold padding codes
        # (3 blocks of 4 bits take 2 bytes), which ORT never reads: compare only the real ones.
        rows = next((a.i for a in node.attribute if a.name == "N"), 0) \
            if node.op_type == "MatMulNBits" else zp.shape[0]
        n_scales = int(np.prod(inits[node.input[2]].dims))
        if rows <= 0 or zp.size % rows or n_scales % rows:
            continue
        packed = zp.reshape(rows, -1)
        codes = np.stack([(packed >> (bits * k)) & ((1 << bits) - 1) for k in range(8 // bits)],
                         axis=-1).reshape(rows, -1)[:, :n_scales // rows]
        if not (codes == 1 << (bits - 1)).all():
            continue
        name = node.input[3]
        node.input[3] = ""
        while node.input and node.input[-1] == "":
            node.input.pop()
        uses[name] -= 1
        if uses[name] == 0:
            proto.graph.initializer.remove(inits.pop(name))
        dropped += 1
    return dropped


def slim_onnx(path: Path) -> None:
    """``slim_proto`` on a saved model file (external data, if any, is left where it is)."""
    proto = onnx.load(str(path), load_external_data=False)
    onnx.save(slim_proto(proto), str(path))


# Without ``slim``: node metadata the dynamo exporter writes, only the module path kept (it maps
# graph nodes back to layers by eye). Stack traces and class lists can triple a small model's file
# and leak local paths.
KEEP_NODE_METADATA = ("pkg.torch.onnx.name_scopes",)


def _strip_node_metadata(path: Path) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key in KEEP_NODE_METADATA]
        del node.metadata_props[:]
        for k, v in keep:
            node.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))


def onnx_files(path: Path) -> list[Path]:
    """The model file plus any external-data files it references."""
    files = [path]
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    files += [path.parent / loc for loc in sorted(locations)]
    return files


def onnx_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in onnx_files(path))


def op_histogram(path: Path) -> dict[str, int]:
    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        key = node.op_type if not node.domain or node.domain == "ai.onnx" else \
            f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
