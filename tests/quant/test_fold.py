import timm
import torch
from torch import nn

from compress.quant.fold import fold_batchnorm, trace_pairs


def _with_random_bn_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_fold_batchnorm_into_conv_keeps_resnet_output():
    torch.manual_seed(0)
    model = _with_random_bn_stats(timm.create_model("test_resnet", num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    folded = fold_batchnorm(model, lambda: model(x))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(folded) == n_bn > 0  # every BN follows a Conv in a ResNet
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    for name in folded:  # the BN is now the identity (weight 1, bias 0, mean 0, var 1 - eps)
        bn = model.get_submodule(name)
        assert torch.all(bn.running_mean == 0) and torch.all(bn.weight == 1)


def test_fold_batchnorm_leaves_a_conv_read_twice_alone():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the raw conv output is also used

    model = _with_random_bn_stats(TwoReaders())
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    assert fold_batchnorm(model, lambda: model(x)) == []
    torch.testing.assert_close(model(x), ref)


def test_trace_pairs_finds_layernorm_linear_by_dataflow_in_swin():
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2,
                              window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                              num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pairs = trace_pairs(model, lambda: model(x), (nn.LayerNorm,), (nn.Linear,))
    # norm2 -> mlp.fc1 in each block and patch merging's norm -> reduction; norm1 reaches qkv
    # only through window partitioning, so it is not a pair.
    assert pairs["layers.0.blocks.0.norm2"] == ["layers.0.blocks.0.mlp.fc1"]
    assert pairs["layers.1.downsample.norm"] == ["layers.1.downsample.reduction"]
    assert "layers.0.blocks.0.norm1" not in pairs
