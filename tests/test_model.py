"""The U-Net is per-sample safe, and initial weights load from the formats a user has."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.model import (
    build_unet,
    check_private_safe,
    group_count,
    load_init_weights,
    make_private_safe,
    plain_state_dict,
)


def tiny_unet(**kwargs) -> nn.Module:
    return build_unet(encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8), **kwargs)


@pytest.mark.slow
def test_default_resnet34_unet_is_private_safe():
    from opacus.validators import ModuleValidator

    model = build_unet()
    assert ModuleValidator.validate(model) == []
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert {m.num_groups for m in norms} == {8}
    assert not [m for m in model.modules() if getattr(m, "inplace", False)]
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)


@pytest.mark.parametrize(
    ("channels", "requested", "expected"),
    [(64, 8, 8), (16, 8, 8), (12, 8, 6), (7, 8, 7), (9, 8, 3), (1, 8, 1), (512, 32, 32)],
)
def test_group_count_is_largest_divisor(channels, requested, expected):
    assert group_count(channels, requested) == expected


def test_group_count_rejects_zero():
    with pytest.raises(ValueError, match="channels >= 1"):
        group_count(0, 8)


def test_tiny_unet_drops_unused_stages():
    model = tiny_unet(group_norm_groups=4)
    assert not hasattr(model.encoder, "layer3")
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {4}
    out = model(torch.randn(3, 1, 32, 32))
    assert out.shape == (3, 1, 32, 32)


def test_unknown_encoder_is_rejected():
    with pytest.raises(ValueError, match="unknown encoder 'resnet-nope'"):
        build_unet(encoder="resnet-nope")


class _Net(nn.Module):
    def __init__(self, norm: nn.Module, *, in_place_add: bool = False, unused: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = norm
        self.in_place_add = in_place_add
        if unused:
            self.spare = nn.Linear(2, 2)

    def forward(self, x):
        out = self.norm(self.conv(x))
        if self.in_place_add:
            out += 1.0
        return out


def test_batchnorm_model_is_rejected():
    with pytest.raises(ValueError, match="BatchNorm layers \\(norm\\).*GroupNorm"):
        check_private_safe(_Net(nn.BatchNorm2d(4)))


def test_in_place_module_is_rejected():
    net = _Net(nn.Sequential(nn.GroupNorm(2, 4), nn.ReLU(inplace=True)))
    with pytest.raises(ValueError, match="in-place modules \\(norm.1\\)"):
        check_private_safe(net)


def test_in_place_add_is_rejected():
    with pytest.raises(ValueError, match="in place.*add_ in <root>"):
        check_private_safe(_Net(nn.GroupNorm(2, 4), in_place_add=True))


def test_unused_parameter_is_rejected():
    with pytest.raises(ValueError, match="unused by the forward pass: spare.weight, spare.bias"):
        check_private_safe(_Net(nn.GroupNorm(2, 4), unused=True))


def test_make_private_safe_fixes_torchvision_style_model():
    import segmentation_models_pytorch as smp

    model = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=1)
    with pytest.raises(ValueError, match="BatchNorm"):
        check_private_safe(model)
    check_private_safe(make_private_safe(model, group_norm_groups=8))


def test_check_restores_mode():
    model = tiny_unet().eval()
    check_private_safe(model)
    assert not model.training


def test_full_state_dict_round_trip_strips_opacus_prefix(tmp_path):
    source = tiny_unet()
    wrapped = {"_module." + k: v for k, v in source.state_dict().items()}
    path = tmp_path / "full.pt"
    torch.save(wrapped, path)
    target = tiny_unet()
    load_init_weights(target, path)
    for key, value in plain_state_dict(source).items():
        assert torch.equal(target.state_dict()[key], value), key


def test_plain_state_dict_strips_prefix():
    from opacus import GradSampleModule

    model = tiny_unet()
    wrapped = GradSampleModule(model)
    keys = set(plain_state_dict(wrapped))
    wrapped._close()
    assert keys == set(model.state_dict())


@pytest.mark.slow
def test_torchvision_encoder_weights_load(tmp_path):
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    state = reference.state_dict()
    path = tmp_path / "resnet18.pt"
    torch.save(state, path)
    model = build_unet(encoder="resnet18")
    decoder_before = model.decoder.blocks[0].conv1[0].weight.clone()
    load_init_weights(model, path)
    assert torch.equal(model.encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.encoder.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.encoder.layer1[0].bn1.weight, state["layer1.0.bn1.weight"])
    assert torch.equal(model.decoder.blocks[0].conv1[0].weight, decoder_before)


def _add_unexpected_key(state):
    state["decoder.extra.weight"] = torch.zeros(3)


def _change_head_shape(state):
    state["segmentation_head.0.weight"] = torch.zeros(2, 8, 3, 3)


def _drop_decoder_key(state):
    del state["decoder.blocks.0.conv1.0.weight"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (_add_unexpected_key, "unexpected keys \\['decoder.extra.weight'\\]"),
        (_change_head_shape, "segmentation_head.0.weight \\(2, 8, 3, 3\\) vs \\(1, 8, 3, 3\\)"),
        (_drop_decoder_key, "lack 1 keys.*decoder.blocks.0.conv1.0.weight"),
    ],
    ids=["unexpected-key", "shape-mismatch", "missing-key"],
)
def test_mismatched_state_dict_is_named(tmp_path, edit, message):
    state = dict(tiny_unet().state_dict())
    edit(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=message):
        load_init_weights(tiny_unet(), path)


def test_missing_and_foreign_files_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_init_weights(tiny_unet(), tmp_path / "nope.pt")
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="expected a state dict"):
        load_init_weights(tiny_unet(), path)
