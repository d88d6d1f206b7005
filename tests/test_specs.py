"""The recipe schema's security rules: constructor kwargs are an allow-list, sizes are bounded.

These hold for ModelSpec and friends themselves, so the CLI, the service and library callers
all get the same rule.
"""

import pytest
from pydantic import ValidationError

from compress.specs import (
    TIMM_KWARGS,
    ExportSpec,
    LatencySpec,
    ModelSpec,
    PreprocessSpec,
)


def _timm(**kwargs) -> dict:
    return {"source": "timm", "name": "test_vit", "weights": "w.safetensors", "kwargs": kwargs}


def _errors(exc: ValidationError) -> dict[str, str]:
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in exc.errors()}


# timm.create_model opens checkpoint_path even with pretrained=False; the others read a file,
# a cache folder or a config that points at one.
@pytest.mark.parametrize("key,value", [
    ("checkpoint_path", "/etc/passwd"),
    ("cache_dir", "/tmp"),
    ("pretrained_cfg", "/srv/data/other-tenant/model.safetensors"),
    ("pretrained_cfg_overlay", "file"),
    ("pretrained", True),
    ("trust_remote_code", True),
])
def test_model_kwargs_refuse_anything_off_the_allow_list(key, value):
    with pytest.raises(ValidationError) as e:
        ModelSpec.model_validate(_timm(img_size=32, **{key: value}))
    errors = _errors(e.value)
    assert list(errors) == [f"kwargs.{key}"]
    msg = errors[f"kwargs.{key}"]
    assert "not allowed in model.kwargs" in msg and "never a path, URL" in msg
    assert "Allowed: num_classes, img_size, in_chans" in msg


def test_allow_list_is_architecture_only():
    assert not {"checkpoint_path", "cache_dir", "pretrained_cfg", "pretrained_cfg_overlay",
                "pretrained", "revision", "token", "trust_remote_code"} & set(TIMM_KWARGS)
    spec = ModelSpec.model_validate(_timm(img_size=[32, 48], patch_size=8, num_classes=0,
                                          global_pool="", depth=4, drop_path_rate=0.1))
    assert spec.kwargs == {"img_size": [32, 48], "patch_size": 8, "num_classes": 0,
                           "global_pool": "", "depth": 4, "drop_path_rate": 0.1}


@pytest.mark.parametrize("kwargs,loc", [
    ({"img_size": 1_000_000}, "kwargs.img_size.constrained-int"),
    ({"img_size": [224, 100_000]}, "kwargs.img_size.list[constrained-int].1"),
    ({"in_chans": 65}, "kwargs.in_chans"),
    ({"num_classes": -1}, "kwargs.num_classes"),
    ({"depth": 100_000}, "kwargs.depth"),
    ({"drop_rate": 2.0}, "kwargs.drop_rate"),
    ({"global_pool": "../x"}, "kwargs.global_pool"),
])
def test_model_kwargs_values_are_bounded(kwargs, loc):
    with pytest.raises(ValidationError) as e:
        ModelSpec.model_validate(_timm(**kwargs))
    assert loc in _errors(e.value)


@pytest.mark.parametrize("name", ["hf-hub:timm/vit_base_patch16_224", "local-dir:/srv/models",
                                  "../../etc/passwd", "Vit Base"])
def test_timm_name_refuses_hub_and_folder_prefixes(name):
    with pytest.raises(ValidationError, match="hub or folder prefixes"):
        ModelSpec.model_validate({**_timm(), "name": name})


def test_timm_name_accepts_tagged_names():
    assert ModelSpec.model_validate({**_timm(), "name": "vit_small_patch16_224.augreg_in21k"})


@pytest.mark.parametrize("spec,data,loc", [
    (ExportSpec, {"verify_batch_sizes": [1e9]}, "verify_batch_sizes.0"),
    (ExportSpec, {"verify_batch_sizes": [0]}, "verify_batch_sizes.0"),
    (ExportSpec, {"verify_batch_sizes": list(range(1, 40))}, "verify_batch_sizes"),
    (LatencySpec, {"batch_sizes": [1e9]}, "batch_sizes.0"),
    (LatencySpec, {"batch_sizes": [-4]}, "batch_sizes.0"),
    (LatencySpec, {"batch_sizes": []}, "batch_sizes"),
    (LatencySpec, {"seq_len": 1_000_000}, "seq_len"),
    (LatencySpec, {"threads": 100_000}, "threads"),
    (PreprocessSpec, {"input_size": [1, 100_000, 100_000]}, "input_size.1"),
    (PreprocessSpec, {"input_size": [3, -224, 224]}, "input_size.1"),
    (PreprocessSpec, {"input_size": [3, 224]}, "input_size"),
    (PreprocessSpec, {"input_size": [1000, 224, 224]}, "input_size"),
    (PreprocessSpec, {"std": [0.0, 1.0, 1.0]}, "std.0"),
    (PreprocessSpec, {"mean": [float("nan")]}, "mean.0"),
])
def test_sizes_are_bounded(spec, data, loc):
    with pytest.raises(ValidationError) as e:
        spec.model_validate(data)
    assert loc in _errors(e.value)


def test_bounds_admit_real_models():
    assert LatencySpec(batch_sizes=[1, 1024], seq_len=8192).batch_sizes == [1, 1024]
    assert PreprocessSpec(input_size=[3, 4096, 4096]).input_size == [3, 4096, 4096]
    assert ExportSpec(verify_batch_sizes=[1, 3, 64]).verify_batch_sizes == [1, 3, 64]


@pytest.mark.parametrize("kwargs", [{"trust_remote_code": True}, {"revision": "main"},
                                    {"cache_dir": "/tmp"}, {"token": "x"}, {"num_classes": 3}])
def test_hf_and_onnx_models_take_no_constructor_kwargs(kwargs):
    for source in ("hf", "onnx"):
        with pytest.raises(ValidationError) as e:
            ModelSpec.model_validate({"source": source, "path": "m", "kwargs": kwargs})
        expected = ("'kwargs' and 'weights' are for source 'timm'" if "num_classes" in kwargs
                    else "not allowed in model.kwargs")
        assert expected in str(e.value)
