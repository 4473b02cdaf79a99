"""Per-layer per-sample gradient algebra for the book-keeping strategy.

For a layer with input activations ``a`` and output gradients ``b`` (the gradient of
the summed per-example losses with respect to the layer output), example ``i``'s weight
gradient depends on ``a_i`` and ``b_i`` alone. This module computes, per layer,

- the squared norm of each example's gradient, optionally after an RS mask, and
- the weighted sum ``sum_i f_i g_i`` of the per-sample gradients, as one batched weight
  gradient of the reweighted output gradients ``f_i b_i`` (the book-keeping trick of
  Bu, Mao, Xu, "Differentially Private Optimization on Large Model at Small Cost",
  ICML 2023, arXiv 2210.00038).

For a convolution without mask, the squared norm comes from the "ghost norm"
``||B_i A_i^T||_F^2 = <A_i^T A_i, B_i^T B_i>`` (Goodfellow, arXiv 1510.01799; Li et al.,
arXiv 2110.05679) when that costs fewer multiply-adds than materialising the gradient:
``T^2 (D + p) < T D p``, i.e. ``T (D + p) < D p``, with ``T`` output positions, ``D``
= in-channels x kernel area and ``p`` out-channels. Deep, low-resolution layers take
the ghost norm, shallow ones materialise each example's weight gradient. Materialised
gradients can be kept (in a caller-provided workspace) and summed directly, so that the
weight-gradient work of such a layer is done once, as in a non-private step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_LAYERS = (nn.Conv2d, nn.GroupNorm, nn.Linear)


def check_supported(name: str, module: nn.Module) -> None:
    """Raise ``ValueError`` unless the book-keeping strategy can handle ``module``."""
    if type(module) not in SUPPORTED_LAYERS:
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_LAYERS)
        raise ValueError(
            f"per-sample strategy 'ghost' supports layers {supported} with trainable "
            f"parameters; {name or '<root>'} is a {type(module).__name__}; use strategy "
            "'loop' or 'opacus' for this model"
        )
    if isinstance(module, nn.Conv2d) and (
        isinstance(module.padding, str) or module.padding_mode != "zeros"
    ):
        raise ValueError(
            f"per-sample strategy 'ghost' needs integer zero padding; {name} has padding "
            f"{module.padding!r} with padding_mode {module.padding_mode!r}; use strategy 'loop'"
        )


@dataclass
class LayerGrads:
    """One layer's per-sample squared gradient norms, and its per-sample gradients if kept.

    Attributes:
        squared: float64 ``(B,)``, each example's squared norm over the layer's own
            parameters, after the RS mask.
        per_sample: masked per-sample gradients ``(B, *param.shape)``, one per own
            parameter, when they were materialised and kept for the weighted sum; None
            when the weighted sum must be recomputed from ``a`` and ``b``.
    """

    squared: Tensor
    per_sample: list[Tensor] | None


def materialises(module: nn.Module, b: Tensor, *, masked: bool) -> bool:
    """Return whether :func:`layer_norms` materialises ``module``'s weight gradients.

    True for GroupNorm and Linear layers, and for convolutions under a mask or where
    the ghost norm costs more than materialising.
    """
    if not isinstance(module, nn.Conv2d):
        return True
    return masked or not _ghost_is_cheaper(module, b)


def layer_norms(
    module: nn.Module,
    a: Tensor,
    b: Tensor,
    dropped: Sequence[Tensor | None],
    *,
    workspace: Tensor | None = None,
) -> LayerGrads:
    """Return each example's squared gradient norm over ``module``'s own parameters.

    ``dropped`` holds, per parameter of ``module`` in ``parameters(recurse=False)``
    order, the RS mask's zeroed coordinates (True = zeroed) or None. A ``workspace`` of
    shape ``(B, *weight.shape)`` lets a convolution keep its materialised per-sample
    weight gradients for :func:`weighted_sum` instead of recomputing the sum.
    """
    if isinstance(module, nn.Conv2d):
        return _conv_norms(module, a, b, dropped, workspace)
    per_sample = _small_per_sample_grads(module, a, b)
    total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for grad, mask in zip(per_sample, dropped):
        if mask is not None:
            grad.masked_fill_(mask, 0.0)
        total += grad.flatten(1).pow(2).sum(1, dtype=torch.float64)
    return LayerGrads(squared=total, per_sample=per_sample)


def weighted_sum(
    module: nn.Module, a: Tensor, b: Tensor, factors: Tensor, grads: LayerGrads
) -> list[Tensor]:
    """Return ``sum_i f_i g_i`` for each of ``module``'s own parameters.

    Kept per-sample gradients are summed directly (and are already masked); otherwise
    one batched weight-gradient pass of the reweighted output gradients ``f_i b_i``
    gives the sum, unmasked.
    """
    if grads.per_sample is not None:
        weights = factors.to(b.dtype)
        return [torch.einsum("i,i...->...", weights, grad) for grad in grads.per_sample]
    scaled = b * factors.to(b.dtype).view(-1, *([1] * (b.dim() - 1)))
    return _conv_backward(module, a, scaled, weight=True, bias=module.bias is not None)


def _conv_norms(
    module: nn.Conv2d,
    a: Tensor,
    b: Tensor,
    dropped: Sequence[Tensor | None],
    workspace: Tensor | None,
) -> LayerGrads:
    batch = a.shape[0]
    total = torch.zeros(batch, dtype=torch.float64, device=a.device)
    weight_mask = dropped[0]
    if not materialises(module, b, masked=weight_mask is not None):
        total += _conv_ghost_norms(module, a, b)
    else:
        for i in range(batch):
            grad = _conv_backward(module, a[i : i + 1], b[i : i + 1], weight=True, bias=False)[0]
            if weight_mask is not None:
                grad.masked_fill_(weight_mask, 0.0)
            total[i] += grad.pow(2).sum(dtype=torch.float64)
            if workspace is not None:
                workspace[i].copy_(grad)
    per_sample = [workspace] if workspace is not None else None
    if module.bias is not None:
        bias_grads = b.flatten(2).sum(2)
        if dropped[1] is not None:
            bias_grads.masked_fill_(dropped[1], 0.0)
        total += bias_grads.pow(2).sum(1, dtype=torch.float64)
        if per_sample is not None:
            per_sample.append(bias_grads)
    return LayerGrads(squared=total, per_sample=per_sample)


def _ghost_is_cheaper(module: nn.Conv2d, b: Tensor) -> bool:
    if module.groups != 1:
        return False
    positions = b.shape[2] * b.shape[3]
    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return positions * (fan_in + module.out_channels) < fan_in * module.out_channels


def _conv_ghost_norms(module: nn.Conv2d, a: Tensor, b: Tensor) -> Tensor:
    patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    outputs = b.flatten(2)
    gram_a = torch.bmm(patches.transpose(1, 2), patches)
    gram_b = torch.bmm(outputs.transpose(1, 2), outputs)
    return (gram_a * gram_b).sum((1, 2), dtype=torch.float64)


def _conv_backward(module: nn.Conv2d, a: Tensor, b: Tensor, *, weight: bool, bias: bool) -> list[Tensor]:
    """Return the summed weight (and bias) gradients of ``module`` for inputs ``a``, output grads ``b``."""
    bias_sizes = [module.out_channels] if bias else None
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        b, a, module.weight, bias_sizes,
        list(module.stride), list(module.padding), list(module.dilation),
        False, [0, 0], module.groups, [False, weight, bias],
    )
    return [grad for grad, wanted in ((grad_weight, weight), (grad_bias, bias)) if wanted]


def _small_per_sample_grads(module: nn.Module, a: Tensor, b: Tensor) -> list[Tensor]:
    """Return materialised per-sample gradients of a GroupNorm or Linear layer."""
    grads: list[Tensor] = []
    if isinstance(module, nn.GroupNorm):
        normalised = F.group_norm(a, module.num_groups, None, None, module.eps)
        grads.append((normalised * b).reshape(*b.shape[:2], -1).sum(2))
        grads.append(b.reshape(*b.shape[:2], -1).sum(2))
        return grads
    if isinstance(module, nn.Linear):
        grads.append(torch.einsum("n...o,n...i->noi", b, a))
        if module.bias is not None:
            grads.append(b.reshape(b.shape[0], -1, b.shape[-1]).sum(1))
        return grads
    raise TypeError(f"no per-sample gradient rule for {type(module).__name__}")
