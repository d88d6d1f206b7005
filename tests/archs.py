"""Tiny random-weight members of four architecture families (ResNet, ConvNeXt, Swin, EVA-02),
with calibration/evaluation crops of scikit-learn's sample photos: the generic quantization
path's test models. A test module's ``arch_files`` fixture returns ``build_arch_files(...)``
(built once per session)."""

from __future__ import annotations

ARCHS = {
    "resnet": ("test_resnet", {"num_classes": 10}, 64),
    "convnext": ("test_convnext", {"num_classes": 10}, 64),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "window_size": 4,
                                              "embed_dim": 16, "depths": (1, 1),
                                              "num_heads": (1, 2), "num_classes": 10}, 32),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 32, "patch_size": 8, "depth": 2,
                                       "embed_dim": 32, "num_heads": 2, "num_classes": 10}, 32),
}


_BUILT: dict = {}


def build_arch_files(tmp_path_factory) -> dict:
    if _BUILT:
        return _BUILT
    import numpy as np
    import timm
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    files = {}
    for key, (name, kwargs, size) in ARCHS.items():
        d = tmp_path_factory.mktemp(key)
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(d / "model.safetensors"))
        rng = np.random.default_rng(0)
        crops = []
        for i in range(48):
            img = photos[i % 2]
            side = int(rng.integers(64, 400))
            y = int(rng.integers(0, img.shape[0] - side))
            x = int(rng.integers(0, img.shape[1] - side))
            t = torch.from_numpy(img[y:y + side, x:x + side].copy()).permute(2, 0, 1)[None] / 255
            t = torch.nn.functional.interpolate(t.float(), size=(size, size), mode="bilinear",
                                                antialias=True)[0]
            crops.append(((t - 0.45) / 0.25).numpy())
        x = np.stack(crops).astype(np.float32)
        np.savez(d / "calib.npz", x=x[:32])
        np.savez(d / "eval.npz", x=x[32:])
        files[key] = {"dir": d, "name": name, "kwargs": kwargs, "size": size}
    _BUILT.update(files)
    return _BUILT


def arch_recipe(f, passes, **extra):
    return {"version": 1, "name": f"tiny-{f['name']}",
            "model": {"source": "timm", "name": f["name"],
                      "kwargs": {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in f["kwargs"].items()},
                      "weights": str(f["dir"] / "model.safetensors"),
                      "preprocess": {"input_size": [3, f["size"], f["size"]]}},
            "calibration": {"path": str(f["dir"] / "calib.npz"), "batch_size": 16},
            "evaluation": {"path": str(f["dir"] / "eval.npz"), "batch_size": 8,
                           "latency": {"enabled": False}},
            "passes": passes, "export": {"verify_batch_sizes": [1, 3]}, **extra}


