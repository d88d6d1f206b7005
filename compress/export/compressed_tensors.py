"""Packed INT-N safetensors in the compressed-tensors ``pack-quantized`` layout.

Hugging Face transformers and vLLM read this format (``quantization_config`` with
``quant_method: compressed-tensors``): each quantized layer stores ``weight_packed`` (int32,
``pack_to_int32`` of signed codes), ``weight_scale`` ``[N, K / group]``, ``weight_shape`` and,
when asymmetric, ``weight_zero_point`` (signed codes, ``pack_to_int32`` along dim 0). Layers with
different widths go into separate ``config_groups``; float layers keep their plain ``weight``.

The zero point's stored shape follows the installed compressed-tensors' load path, not only its
packer: transformers builds the model to load into with ``apply_quantization_config`` and
``compress_model`` on meta tensors, and compressed-tensors 0.20 leaves the zero point there at
its unpacked shape ``[N, K / group]`` while ``pack_to_int32`` writes ``[ceil(N * bits / 32), K /
group]``; a checkpoint of the packed shape then fails with a size mismatch (``[48, 12]`` vs
``[384, 12]`` on MiniLM). ``unpack_from_int32`` reads only the leading ``ceil(N * bits / 32)``
rows, so the packed rows followed by zero rows up to the shape the load path allocates decode to
the same zero points in both layouts (``zero_point_rows_at_load`` asks compressed-tensors).
"""

from __future__ import annotations

import contextlib
import io
import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..quant.weight_only import GroupQuantized


def _signed(t: torch.Tensor, bits: int) -> torch.Tensor:
    return (t.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)


def weights_args(bits: int, block: int, symmetric: bool) -> dict:
    """The ``weights`` quantization args of a config group (compressed-tensors field names)."""
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group",
            "group_size": block, "dynamic": False, "observer": "minmax"}


@lru_cache(maxsize=64)
def zero_point_rows_at_load(rows: int, columns: int, bits: int, block: int) -> int:
    """Rows of ``weight_zero_point`` in the model compressed-tensors builds for loading an
    asymmetric ``[rows, columns]`` layer: the same calls transformers makes before reading the
    checkpoint (``apply_quantization_config``, then ``compress_model`` on meta tensors)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    config = QuantizationConfig.model_validate({
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized",
                                      "weights": weights_args(bits, block, False)}}})
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Linear(columns, rows))
    # Both calls draw tqdm bars on stderr; here they would only clutter a run's log.
    with contextlib.redirect_stderr(io.StringIO()):
        apply_quantization_config(skeleton, config, False)
        ModelCompressor(quantization_config=config).compress_model(skeleton)
    return int(skeleton[0].weight_zero_point.shape[0])


def packed_zero_point(zero: torch.Tensor, bits: int, block: int, columns: int) -> torch.Tensor:
    """``zero`` ``[N, groups]`` (unsigned codes) packed along dim 0 as compressed-tensors packs
    it, zero-padded to the rows its load path allocates (see the module docstring)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    packed = pack_to_int32(_signed(zero, bits), bits, packed_dim=0)
    rows = zero_point_rows_at_load(zero.shape[0], columns, bits, block)
    if rows > packed.shape[0]:
        packed = torch.cat([packed, packed.new_zeros(rows - packed.shape[0], packed.shape[1])])
    return packed.contiguous()


def compressed_layer_tensors(gq: GroupQuantized, symmetric: bool) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {
        "weight_packed": pack_to_int32(_signed(gq.codes, gq.bits), gq.bits),
        "weight_scale": gq.scale.float().contiguous(),
        "weight_shape": torch.tensor(list(gq.codes.shape)),
    }
    if not symmetric:
        out["weight_zero_point"] = packed_zero_point(gq.zero, gq.bits, gq.block,
                                                     gq.codes.shape[1])
    return out


def quantization_config(layers: dict[str, tuple[GroupQuantized, bool, str]],
                        ignore: list[str]) -> dict:
    """``layers``: name -> (codes, symmetric, module class name); one group per scheme."""
    groups: dict[tuple, list[str]] = {}
    for name, (gq, sym, _) in layers.items():
        groups.setdefault((gq.bits, gq.block, sym), []).append(name)
    config_groups = {}
    for i, ((bits, block, sym), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": sorted(names),
            "weights": weights_args(bits, block, sym),
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    # run_compressed false: transformers decompresses right after loading. Left at its default
    # (true) it waits for a forward pre-hook on the top model, which sentence-transformers never
    # fires (it calls ``model.forward`` directly) and every Linear then lacks its weight.
    # compressed-tensors and vLLM ignore the key.
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": sorted(ignore), "kv_cache_scheme": None, "run_compressed": False}
def save_pack_quantized(module: nn.Module, layers: dict[str, tuple[GroupQuantized, bool, str]],
                        out_dir: Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` for ``module`` whose ``layers`` (by module
    name) are quantized. A ``SentenceEmbedder`` is saved as its inner transformer (HF names)."""
    from safetensors.torch import save_file

    prefix = ""
    root = module
    if hasattr(module, "transformer") and hasattr(module.transformer, "config"):
        root, prefix = module.transformer, "transformer."
    out_dir.mkdir(parents=True, exist_ok=True)
    local = {n.removeprefix(prefix): v for n, v in layers.items()}
    # Hugging Face transformers (5.x) allocates unpacked zero points for quantized Embeddings
    # but the pack-quantized compressor packs them, so such checkpoints do not load: embeddings
    # go in as their dequantized float weights (listed under ``ignore``).
    dense = {n: v for n, v in local.items() if v[2] == "Embedding"}
    local = {n: v for n, v in local.items() if n not in dense}
    tensors: dict[str, torch.Tensor] = {}
    quantized_mods = set(local)
    for name, mod in root.named_modules():
        if name in dense:
            tensors[f"{name}.weight"] = dense[name][0].dequantize().contiguous()
            continue
        if name in quantized_mods:
            gq, sym, _ = local[name]
            for k, v in compressed_layer_tensors(gq, sym).items():
                tensors[f"{name}.{k}"] = v
            bias = getattr(mod, "bias", None)
            if isinstance(bias, torch.Tensor):
                tensors[f"{name}.bias"] = bias.detach().float().contiguous()
            continue
        if any(name.startswith(q + ".") for q in quantized_mods):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)) + \
                list(mod.named_buffers(recurse=False)):
            key = f"{name}.{pname}" if name else pname
            if p.dtype.is_floating_point or pname in ("position_ids", "token_type_ids"):
                tensors[key] = p.detach().contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = root.config.to_dict() if hasattr(root, "config") and hasattr(root.config, "to_dict") \
        else {}
    all_linear = [n for n, m in root.named_modules()
                  if isinstance(m, (nn.Linear, nn.Embedding)) and n not in quantized_mods]
    all_linear += list(dense)
    cfg["quantization_config"] = quantization_config(local, all_linear)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return out_dir / "model.safetensors"
