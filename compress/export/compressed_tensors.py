"""Packed INT-N safetensors in the compressed-tensors ``pack-quantized`` layout.

Hugging Face transformers and vLLM read this format (``quantization_config`` with
``quant_method: compressed-tensors``): each quantized layer stores ``weight_packed`` (int32,
``pack_to_int32`` of signed codes), ``weight_scale`` ``[N, K / group]``, ``weight_shape`` and,
when asymmetric, ``weight_zero_point`` (signed, packed along dim 0). Layers with different
widths go into separate ``config_groups``; float layers keep their plain ``weight``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..quant.weight_only import GroupQuantized


def _signed(t: torch.Tensor, bits: int) -> torch.Tensor:
    return (t.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)


def compressed_layer_tensors(gq: GroupQuantized, symmetric: bool) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {
        "weight_packed": pack_to_int32(_signed(gq.codes, gq.bits), gq.bits),
        "weight_scale": gq.scale.float().contiguous(),
        "weight_shape": torch.tensor(list(gq.codes.shape)),
    }
    if not symmetric:
        out["weight_zero_point"] = pack_to_int32(_signed(gq.zero, gq.bits), gq.bits,
                                                 packed_dim=0).contiguous()
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
            "weights": {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group",
                        "group_size": block, "dynamic": False, "observer": "minmax"},
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": sorted(ignore), "kv_cache_scheme": None}


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
    tensors: dict[str, torch.Tensor] = {}
    quantized_mods = set(local)
    for name, mod in root.named_modules():
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
    cfg["quantization_config"] = quantization_config(local, all_linear)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return out_dir / "model.safetensors"
