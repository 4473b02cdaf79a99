"""The segmentation model: an smp U-Net made safe for per-sample gradients.

Per-sample gradients (DP-SGD) need every example's gradient to depend on that example
alone, and Opacus's hooks need module outputs that are not modified in place. So
:func:`build_unet` takes segmentation-models-pytorch's U-Net (``encoder_weights=None``,
nothing is downloaded) and

- replaces every BatchNorm with GroupNorm (BatchNorm mixes the examples of a batch),
  with the group count given by :func:`group_count`;
- turns off ``inplace`` in every activation and swaps torchvision's residual blocks, which
  do ``out += identity``, for :class:`ResidualBlock`, which adds out of place;
- checks the result with :func:`check_private_safe`.

The non-private baseline uses the same model, so the methods differ only in training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

OPACUS_PREFIX = "_module."
"""Prefix that Opacus's ``GradSampleModule`` adds to every state-dict key."""

CHECK_IMAGE_SIZE = 64
"""Side in pixels of the dummy input :func:`check_private_safe` runs (a multiple of 32)."""

# Keys of BatchNorm running statistics: GroupNorm has no counterpart, so they are dropped.
_BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
# Keys of the classification head of a torchvision ResNet, which a U-Net encoder lacks.
_CLASSIFIER_PREFIXES = ("fc.",)


def group_count(channels: int, requested: int) -> int:
    """Return the number of GroupNorm groups for ``channels`` channels.

    Rule: the largest divisor of ``channels`` that is at most ``requested``. With the
    default 8 groups every layer of the ResNet34 U-Net (64 to 512 encoder channels, 256
    to 16 decoder channels) gets exactly 8 groups. Opacus's automatic fix instead uses
    ``gcd(32, channels)``, which for narrow decoder stages degenerates towards
    per-channel (instance) normalisation.
    """
    if channels < 1 or requested < 1:
        raise ValueError(
            f"group_count needs channels >= 1 and requested >= 1; got {channels}, {requested}"
        )
    return max(g for g in range(1, min(channels, requested) + 1) if channels % g == 0)


class ResidualBlock(nn.Module):
    """Out-of-place version of torchvision's ``BasicBlock`` and ``Bottleneck``.

    Holds the original block's submodules under their original names, so state-dict
    keys stay those of a torchvision ResNet. The forward pass is the same computation
    but adds the shortcut with ``out + identity`` and applies ReLU out of place.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample")
        for name in names:
            child = getattr(block, name, None)
            if child is not None:
                self.add_module(name, child)
        self.bottleneck = hasattr(block, "conv3")
        self.relu = nn.ReLU(inplace=False)
        self.stride = getattr(block, "stride", 1)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.bottleneck:
            out = self.bn3(self.conv3(self.relu(out)))
        if getattr(self, "downsample", None) is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


def build_unet(
    *,
    encoder: str = "resnet34",
    group_norm_groups: int = 8,
    in_channels: int = 1,
    classes: int = 1,
    encoder_depth: int = 5,
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
) -> nn.Module:
    """Build a per-sample-safe smp U-Net with random weights (nothing is downloaded).

    ``decoder_channels`` needs one entry per encoder stage (``encoder_depth`` entries).
    The output is one logit map per class at the input resolution; input sides must be
    multiples of ``2 ** encoder_depth``.
    """
    import segmentation_models_pytorch as smp

    if len(decoder_channels) != encoder_depth:
        raise ValueError(
            f"decoder_channels needs {encoder_depth} entries for encoder_depth "
            f"{encoder_depth}; got {tuple(decoder_channels)}"
        )
    try:
        model = smp.Unet(
            encoder_name=encoder,
            encoder_weights=None,
            encoder_depth=encoder_depth,
            decoder_channels=tuple(decoder_channels),
            in_channels=in_channels,
            classes=classes,
        )
    except KeyError as error:
        raise ValueError(
            f"unknown encoder {encoder!r}; use a name from "
            "segmentation_models_pytorch.encoders.get_encoder_names(), e.g. resnet34"
        ) from error
    _drop_unused_resnet_stages(model.encoder, encoder_depth)
    make_private_safe(model, group_norm_groups=group_norm_groups)
    check_private_safe(model, image_size=max(CHECK_IMAGE_SIZE, 2**encoder_depth))
    return model


def _drop_unused_resnet_stages(encoder: nn.Module, encoder_depth: int) -> None:
    # smp's ResNet encoder keeps layer1..layer4 but runs layer k only when
    # encoder_depth > k; unused stages would hold parameters without gradients.
    for k in range(max(1, encoder_depth), 5):
        if isinstance(getattr(encoder, f"layer{k}", None), nn.Module):
            delattr(encoder, f"layer{k}")


def make_private_safe(model: nn.Module, *, group_norm_groups: int) -> nn.Module:
    """Replace BatchNorm, in-place activations and in-place residual adds, in place.

    BatchNorm layers become ``GroupNorm(group_count(C, group_norm_groups), C)`` with the
    BatchNorm's ``eps`` and fresh affine parameters. Returns ``model`` for chaining.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for name, child in list(model.named_children()):
        if isinstance(child, (BasicBlock, Bottleneck)):
            child = ResidualBlock(child)
            setattr(model, name, child)
        if isinstance(child, _BatchNorm):
            groups = group_count(child.num_features, group_norm_groups)
            setattr(model, name, nn.GroupNorm(groups, child.num_features, eps=child.eps))
            continue
        if getattr(child, "inplace", False) is True:
            child.inplace = False
        make_private_safe(child, group_norm_groups=group_norm_groups)
    return model


def check_private_safe(model: nn.Module, *, image_size: int = CHECK_IMAGE_SIZE) -> None:
    """Raise ``ValueError`` unless ``model`` is safe for per-sample gradients.

    Checks, in order:

    1. no BatchNorm layer;
    2. no module has ``inplace=True``;
    3. Opacus's ``ModuleValidator.validate`` returns no error;
    4. a forward pass on one random ``image_size x image_size`` image performs no
       in-place operation on a tensor that requires grad;
    5. every trainable parameter receives a gradient from that pass.

    The model's train/eval mode and its ``.grad`` fields are left as they were.
    """
    from opacus.validators import ModuleValidator

    batchnorms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if batchnorms:
        raise ValueError(
            f"model has BatchNorm layers ({', '.join(batchnorms[:5])}"
            f"{', ...' if len(batchnorms) > 5 else ''}): BatchNorm normalises with "
            "statistics of the whole batch, so one example's gradient depends on the "
            "others and per-sample clipping no longer bounds its influence; build the "
            "model with build_unet or call make_private_safe to use GroupNorm"
        )
    inplace = [name for name, m in model.named_modules() if getattr(m, "inplace", False) is True]
    if inplace:
        raise ValueError(
            f"model has in-place modules ({', '.join(inplace[:5])}): Opacus's backward "
            "hooks fail on outputs modified in place; set inplace=False or call "
            "make_private_safe"
        )
    was_training = model.training
    model.train()
    try:
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(
                "Opacus ModuleValidator rejects the model: " + "; ".join(map(str, errors))
            )
        _check_forward(model, image_size)
    finally:
        model.train(was_training)


def _check_forward(model: nn.Module, image_size: int) -> None:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ValueError("check_private_safe expects a convolutional model; found no Conv2d")
    reference = next(model.parameters())
    x = torch.randn(
        1, first_conv.in_channels, image_size, image_size,
        device=reference.device, dtype=reference.dtype,
    )
    with _InPlaceSpy(model) as spy:
        out = model(x)
    if spy.found:
        raise ValueError(
            "model modifies tensors that require grad in place, which breaks per-sample "
            f"gradient hooks: {'; '.join(sorted(spy.found)[:5])}; rewrite these as "
            "out-of-place operations (for example out = out + identity)"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.float().sum(), [p for _, p in named], allow_unused=True)
    unused = [n for (n, _), g in zip(named, grads) if g is None]
    if unused:
        raise ValueError(
            f"trainable parameters unused by the forward pass: {', '.join(unused[:5])}"
            f"{', ...' if len(unused) > 5 else ''}; Opacus expects a gradient for every "
            "trainable parameter, so delete these modules or set requires_grad=False"
        )


class _InPlaceSpy(TorchFunctionMode):
    """Record in-place torch calls on tensors that require grad, with the module they ran in."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.found: set[str] = set()
        self._stack: list[str] = []
        self._model = model
        self._handles: list = []

    def __enter__(self):
        for name, module in self._model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._push(name or "<root>")))
            self._handles.append(module.register_forward_hook(self._pop))
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*exc)

    def _push(self, name: str):
        def hook(module, args):
            self._stack.append(name)

        return hook

    def _pop(self, module, args, output):
        self._stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        in_place = (
            kwargs.get("inplace") is True
            or (name.endswith("_") and not name.endswith("__"))
            or name in ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__")
        )
        target = args[0] if args else None
        if in_place and isinstance(target, Tensor) and target.requires_grad:
            where = self._stack[-1] if self._stack else "<root>"
            self.found.add(f"{name} in {where}")
        return func(*args, **kwargs)


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Return ``model``'s state dict with Opacus's ``_module.`` prefixes removed."""
    return {strip_opacus_prefix(k): v for k, v in model.state_dict().items()}


def strip_opacus_prefix(key: str) -> str:
    """Return ``key`` without any ``_module.`` prefix that Opacus wrappers added."""
    while key.startswith(OPACUS_PREFIX):
        key = key[len(OPACUS_PREFIX):]
    return key


def load_init_weights(model: nn.Module, path: str | Path) -> None:
    """Load starting weights from a state-dict file into ``model`` (a :func:`build_unet`).

    Accepts a full U-Net state dict (for example from a model trained without privacy
    on public or synthetic data), or encoder weights alone, either with the ``encoder.``
    prefix or as plain torchvision ResNet keys (``conv1.weight``, ``layer1.0.bn1.weight``).
    ``_module.`` prefixes are stripped. BatchNorm running statistics and a ResNet's
    ``fc.`` classifier are dropped; BatchNorm affine weights load into the GroupNorm
    of the same name. A 3-channel first convolution is summed over its input channels
    to fit a 1-channel model, which gives the same output as feeding the grey image
    three times. Any other mismatch raises ``ValueError`` listing the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"init weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"cannot read init weights {path} as a torch state dict: {error}") from error
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"init weights {path} hold a {type(loaded).__name__}, expected a state dict "
            "(a mapping from parameter names to tensors)"
        )
    target = plain_state_dict(model)
    state = _normalise_keys(loaded, target, path)
    _fit_first_conv(state, target)
    _load_checked(model, state, target, path)


def _normalise_keys(
    loaded: Mapping[str, Tensor], target: Mapping[str, Tensor], path: Path
) -> dict[str, Tensor]:
    state = {strip_opacus_prefix(k): v for k, v in loaded.items()}
    if not any(k in target for k in state) and any(f"encoder.{k}" in target for k in state):
        state = {f"encoder.{k}": v for k, v in state.items()}
    dropped = [
        k for k in state
        if k.rsplit(".", 1)[-1] in _BATCHNORM_BUFFERS and k not in target
        or k.startswith(_CLASSIFIER_PREFIXES)
        or k.startswith(tuple(f"encoder.{p}" for p in _CLASSIFIER_PREFIXES))
    ]
    if dropped:
        logger.info(
            "init weights %s: dropped %d BatchNorm-statistics and classifier keys", path,
            len(dropped),
        )
    return {k: v for k, v in state.items() if k not in dropped}


def _fit_first_conv(state: dict[str, Tensor], target: Mapping[str, Tensor]) -> None:
    key = "encoder.conv1.weight"
    if key in state and key in target:
        have, want = state[key], target[key]
        if have.shape != want.shape and have.shape[1] == 3 and want.shape[1] == 1:
            state[key] = have.sum(dim=1, keepdim=True)


def _load_checked(
    model: nn.Module, state: dict[str, Tensor], target: Mapping[str, Tensor], path: Path
) -> None:
    unexpected = sorted(k for k in state if k not in target)
    shape_errors = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in state if k in target and state[k].shape != target[k].shape
    )
    if unexpected or shape_errors or not state:
        raise ValueError(
            f"init weights {path} do not fit the model: unexpected keys "
            f"{unexpected[:10] or 'none'}; shape mismatches {shape_errors[:10] or 'none'}"
            f"{'; the file has no usable keys' if not state else ''}"
        )
    encoder_only = all(k.startswith("encoder.") for k in state)
    required = [k for k in target if k.startswith("encoder.")] if encoder_only else list(target)
    missing = sorted(k for k in required if k not in state)
    if missing:
        raise ValueError(
            f"init weights {path} lack {len(missing)} keys the model needs, e.g. "
            f"{missing[:10]}; give a full U-Net state dict or complete encoder weights"
        )
    prefix = _opacus_prefix(model)
    model.load_state_dict({prefix + k: v for k, v in state.items()}, strict=not encoder_only)
    logger.info(
        "loaded init weights %s (%s, %d tensors)", path,
        "encoder only" if encoder_only else "full model", len(state),
    )


def _opacus_prefix(model: nn.Module) -> str:
    key = next(iter(model.state_dict()), "")
    prefix = ""
    while key.startswith(OPACUS_PREFIX):
        prefix += OPACUS_PREFIX
        key = key[len(OPACUS_PREFIX):]
    return prefix
