"""Per-layer per-sample gradient algebra for the book-keeping strategy.

For a layer with input activations ``a`` and output gradients ``b`` (the gradient of
the summed per-example losses with respect to the layer output), example ``i``'s
gradients of the layer's parameters depend on ``a_i`` and ``b_i`` alone. During the
backward pass, :func:`book_layer` computes each example's squared gradient norm over the
layer's parameters (after the RS mask) and keeps what the clipped sum needs later:

- the per-sample gradients themselves, at the mask's kept coordinates only, when they fit
  in the memory allowance it is given; or
- ``a`` and ``b``, from which :func:`weighted_sums` recomputes ``sum_i f_i g_i`` as
  one batched weight gradient of the reweighted output gradients ``f_i b_i`` (the
  book-keeping trick of Bu, Mao, Xu, "Differentially Private Optimization on Large Model
  at Small Cost", ICML 2023, arXiv 2210.00038).

For an unmasked convolution the squared norm comes from the "ghost norm"
``||B_i A_i^T||_F^2 = <A_i^T A_i, B_i^T B_i>`` (Goodfellow, arXiv 1510.01799; Li et al.,
arXiv 2110.05679) where that costs a small fraction of materialising the gradient.
Deep, low-resolution layers take the ghost norm; the others materialise their
per-sample gradients with the kernel measured fastest for the layer's shape. Under an RS
mask, low-resolution convolutions compute their gradients at the kept coordinates only,
with a sampled sparse product. :mod:`common.privacy.conv_grads` holds these kernels and
the rules that choose between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from common.privacy import conv_grads
from common.privacy.sparsify import keep_factors

SUPPORTED_LAYERS = (nn.Conv2d, nn.GroupNorm, nn.Linear)
_SELECT_MAX_SHARE = 0.25  # of a parameter's coordinates kept, see _flat_values

Rows = Tensor | list[Tensor]
"""One parameter's flattened per-sample gradients: a ``(B, n)`` tensor, or ``B`` tensors
of shape ``(1, n)`` where a kernel computes them one example at a time (stacking them
would copy them all)."""

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


@dataclass(frozen=True)
class ParamMask:
    """One parameter's part of an RS mask.

    Attributes:
        dropped: bool, the parameter's shape, True where zeroed.
        kept_index: the flat indices of the kept coordinates, ascending.
        rows, cols: for a convolution weight, the kept coordinates as a CSR pattern of the
            ``(out-channels, in-channels x kernel area)`` matrix (see :func:`conv_mask`).
    """

    dropped: Tensor
    kept_index: Tensor
    rows: Tensor | None = None
    cols: Tensor | None = None


def conv_mask(dropped: Tensor, kept_index: Tensor) -> ParamMask:
    """Return the mask part of a convolution weight, with its CSR pattern."""
    rows, cols = conv_grads.csr_pattern(dropped, kept_index)
    return ParamMask(dropped=dropped, kept_index=kept_index, rows=rows, cols=cols)


@dataclass
class LayerBook:
    """What one layer keeps between the backward pass and the clipped sum.

    Attributes:
        squared: float64 ``(B,)``, each example's squared gradient norm over the layer's
            own parameters, after the RS mask.
        values: per own parameter, the per-sample gradients as :data:`Rows` of ``n``
            coordinates: all of them without a mask; under a mask, the kept coordinates
            only, or all of them with zeros where dropped (see :func:`_flat_values`).
            None where the sum is recomputed from ``a`` and ``b``.
        a: the layer input, kept only if some value is None.
        b: the output gradient, kept only if some value is None.
        rounding: float64 ``(B,)`` or None, for a convolution whose clipped sum is
            recomputed: a bound on the norm of the difference between each example's
            share of the recomputed sum and the gradient whose norm ``squared`` bounds
            (see :func:`recompute_rounding`). Clipping adds it to the norm, so that what
            is summed stays within the clipping bound however much the sum cancels.
    """

    squared: Tensor
    values: list[Rows | None]
    a: Tensor | None = None
    b: Tensor | None = None
    rounding: Tensor | None = None

    @property
    def stored(self) -> int:
        """Number of tensor elements this book holds."""
        saved = [t for t in (self.a, self.b) if t is not None]
        return sum(t.numel() for t in saved) + sum(_rows_numel(v) for v in self.values if v is not None)


def book_layer(
    module: nn.Module,
    a: Tensor,
    b: Tensor,
    masks: Sequence[ParamMask | None],
    *,
    allowance: int,
    stats: tuple[Tensor, Tensor] | None = None,
) -> LayerBook:
    """Return ``module``'s per-sample squared norms and what its clipped sum will need.

    ``masks`` holds, per parameter of ``module`` in ``parameters(recurse=False)`` order,
    its part of the RS mask or None. Per-sample gradients are kept when their kept
    coordinates number at most ``allowance`` elements; otherwise ``a`` and ``b`` are.
    ``stats`` are a GroupNorm's forward (mean, 1/std), see :func:`group_norm_stats`.
    """
    params = list(module.parameters(recurse=False))
    if masks[0] is None and conv_grads.ghost_is_cheaper(module, a, b):
        return _ghost_book(module, a, b, masks)
    kept = b.shape[0] * sum(p.numel() if m is None else m.kept_index.numel() for p, m in zip(params, masks))
    if masks[0] is None and kept > allowance and conv_grads.ghost_is_cheaper(module, a, b, fraction=1.0):
        # The per-sample gradients would not be kept: a ghost norm costing less than
        # materialising them only to throw them away.
        return _ghost_book(module, a, b, masks)
    if masks[0] is not None and _masked_norms_pay(module, b, masks[0], allowance):
        return _norms_only_book(module, a, b, masks, *conv_grads.masked_squared_norms(module, a, b, masks[0].dropped))
    values = _kept_values(module, a, b, masks, stats)
    squared = sum(_squared_norms(v) for v in values)
    if sum(_rows_numel(v) for v in values) <= allowance:
        return LayerBook(squared=squared, values=values)
    rounding = None
    if isinstance(module, nn.Conv2d):
        rounding = recompute_rounding(b, a.dtype, conv_grads.spread(module, a, b))
    return LayerBook(squared=squared, values=[None] * len(params), a=a, b=b, rounding=rounding)


def _kept_values(
    module: nn.Module,
    a: Tensor,
    b: Tensor,
    masks: Sequence[ParamMask | None],
    stats: tuple[Tensor, Tensor] | None,
) -> list[Rows]:
    """Return the per-sample gradients at the kept coordinates, ``kept`` per row and parameter."""
    mask = masks[0]
    if (
        isinstance(module, nn.Conv2d)
        and mask is not None
        and mask.rows is not None
        and conv_grads.sampling_pays(module, b, mask.kept_index.numel(), mask.dropped.numel())
    ):
        return _with_conv_bias(module, b, masks, conv_grads.sampled_weight(module, a, b, mask.rows, mask.cols))
    if isinstance(module, nn.Conv2d) and conv_grads.conv_method(module, b.shape[2] * b.shape[3]) == "loop":
        rows = [_flat_values(g.view(1, -1), mask) for g in conv_grads.per_example_weights(module, a, b)]
        if mask is not None and rows[0].shape[1] < mask.dropped.numel():
            rows = torch.cat(rows)  # the rows hold the kept coordinates only, so this copies a small share
        return _with_conv_bias(module, b, masks, rows)
    grads = per_sample_grads(module, a, b, stats=stats)
    return [_flat_values(grad, mask) for grad, mask in zip(grads, masks)]


def _with_conv_bias(module: nn.Conv2d, b: Tensor, masks: Sequence[ParamMask | None], weight: Rows) -> list[Rows]:
    if module.bias is None:
        return [weight]
    return [weight, _flat_values(_conv_bias_grads(b), masks[1])]


def _masked_norms_pay(module: nn.Module, b: Tensor, mask: ParamMask, allowance: int) -> bool:
    """Return whether a masked convolution weight should take its norms without per-sample gradients.

    Always at few output positions, where the masked ghost norm is the fastest kernel.
    Otherwise where the per-sample gradients would not be kept (more than ``allowance``
    elements) and the sampled product, which is faster, does not pay.
    """
    if not isinstance(module, nn.Conv2d):
        return False
    positions = b.shape[2] * b.shape[3]
    if module.groups == 1 and positions <= conv_grads.MASKED_GHOST_MAX_POSITIONS:
        return True
    kept_count, size = mask.kept_index.numel(), mask.dropped.numel()
    if mask.rows is not None and conv_grads.sampling_pays(module, b, kept_count, size):
        return False
    stored = kept_count if kept_count <= _SELECT_MAX_SHARE * size else size  # as _flat_values keeps them
    return b.shape[0] * stored > allowance


def _ghost_book(module: nn.Conv2d, a: Tensor, b: Tensor, masks: Sequence[ParamMask | None]) -> LayerBook:
    return _norms_only_book(module, a, b, masks, *conv_grads.ghost_squared_norms(module, a, b))


def recompute_rounding(b: Tensor, dtype: torch.dtype, spread: Tensor) -> Tensor:
    """Return a bound on the rounding of each example's share of a recomputed convolution sum.

    The batched weight gradient sums ``B T`` products per weight, and the norm came
    from per-sample values summed over ``T`` products, or from exact Gram matrices. Both
    roundings are at most ``gamma_n`` times :func:`common.privacy.conv_grads.spread`
    for ``n = B T + T + 4`` (the reweighting included).
    """
    positions = b[0, 0].numel()
    return conv_grads.rounding_factor(b.shape[0] * positions + positions + 4, dtype) * spread


def _norms_only_book(
    module: nn.Conv2d,
    a: Tensor,
    b: Tensor,
    masks: Sequence[ParamMask | None],
    squared: Tensor,
    spread: Tensor,
) -> LayerBook:
    """Return the book of a convolution whose weight has norms ``squared`` but no kept gradients.

    The clipped sum of its weight is recomputed from ``a`` and ``b``; its bias, if any,
    keeps its per-sample gradients (one value per output channel).
    """
    values: list[Tensor | None] = [None]
    if module.bias is not None:
        bias = _flat_values(_conv_bias_grads(b), masks[1])
        squared = squared + _squared_norms(bias)
        values.append(bias)
    return LayerBook(squared=squared, values=values, a=a, b=b, rounding=recompute_rounding(b, a.dtype, spread))


def weighted_sums(
    module: nn.Module, book: LayerBook, factors: Tensor, masks: Sequence[ParamMask | None]
) -> list[Tensor]:
    """Return ``sum_i f_i (m * g_i)`` for each own parameter of ``module``, as new tensors."""
    recomputed = None
    if any(v is None for v in book.values):
        scaled = book.b * factors.to(book.b.dtype).view(-1, *([1] * (book.b.dim() - 1)))
        recomputed = summed_grads(module, book.a, scaled)
    sums = []
    for k, (param, values, mask) in enumerate(zip(module.parameters(recurse=False), book.values, masks)):
        if values is None:
            grad = recomputed[k]
            if mask is not None:
                grad.mul_(keep_factors(mask.dropped, grad.dtype))
            sums.append(grad)
            continue
        summed = _weighted_rows(factors, values)
        if summed.numel() == param.numel():  # unmasked, or masked by zeros
            sums.append(summed.view(param.shape))
        else:
            grad = param.new_zeros(param.shape)
            grad.view(-1).index_copy_(0, mask.kept_index, summed)
            sums.append(grad)
    return sums


def per_sample_grads(
    module: nn.Module, a: Tensor, b: Tensor, *, stats: tuple[Tensor, Tensor] | None = None
) -> list[Tensor]:
    """Return the per-sample gradients ``(B, *param.shape)`` of ``module``'s own parameters."""
    if isinstance(module, nn.Conv2d):
        grads = [conv_grads.per_sample_weight(module, a, b)]
        if module.bias is not None:
            grads.append(_conv_bias_grads(b))
        return grads
    if isinstance(module, nn.GroupNorm):
        return _group_norm_per_sample(module, a, b, stats)
    if isinstance(module, nn.Linear):
        grads = [torch.einsum("n...o,n...i->noi", b, a)]
        if module.bias is not None:
            grads.append(b.reshape(b.shape[0], -1, b.shape[-1]).sum(1))
        return grads
    raise TypeError(f"no per-sample gradient rule for {type(module).__name__}")


def summed_grads(module: nn.Module, a: Tensor, b: Tensor) -> list[Tensor]:
    """Return the batch-summed gradients of ``module``'s own parameters for output gradients ``b``."""
    if not isinstance(module, nn.Conv2d):
        return [grad.sum(0) for grad in per_sample_grads(module, a, b)]
    bias_sizes = [module.out_channels] if module.bias is not None else None
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        b, a, module.weight, bias_sizes,
        list(module.stride), list(module.padding), list(module.dilation),
        False, [0, 0], module.groups, [False, True, module.bias is not None],
    )
    return [grad_weight] if module.bias is None else [grad_weight, grad_bias]


def group_norm_stats(output: Tensor) -> tuple[Tensor, Tensor] | None:
    """Return the (mean, 1/std) per example and group that made GroupNorm ``output``, if saved.

    Autograd saves them for the backward pass. Reading them back saves recomputing
    statistics over the whole input, which is the slowest part of a GroupNorm's
    per-sample gradients at high resolution. None where the autograd node differs.
    """
    node = output.grad_fn
    if node is None or type(node).__name__ != "NativeGroupNormBackward0":
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()


def _group_norm_per_sample(
    module: nn.GroupNorm, a: Tensor, b: Tensor, stats: tuple[Tensor, Tensor] | None
) -> list[Tensor]:
    """Return the per-sample (weight, bias) gradients of an affine GroupNorm, from its own backward kernel.

    The batch viewed as one example of ``B x C`` channels in ``B x G`` groups has the
    same statistics per group, and its weight and bias gradients sum over no examples:
    they are the per-sample ones, ``sum_x xhat b`` and ``sum_x b`` over each channel's
    positions x. The kernel reads ``a`` and ``b`` once for both; two reductions in torch
    took 2.6 to 5 times as long at the U-Net's shapes (batch 8, 2 CPU threads).
    """
    batch, channels = b.shape[:2]
    groups = module.num_groups
    if stats is None:
        var, mean = torch.var_mean(a.reshape(batch, groups, -1), dim=2, unbiased=False)
        rstd = (var + module.eps).rsqrt()
    else:
        mean, rstd = stats
    wide = (1, batch * channels, -1)
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        b.reshape(wide), a.reshape(wide), mean.reshape(1, -1).to(a.dtype), rstd.reshape(1, -1).to(a.dtype),
        None, 1, batch * channels, a[0, 0].numel(), batch * groups, [False, True, True],
    )
    return [weight.view(batch, channels), bias.view(batch, channels)]


def _conv_bias_grads(b: Tensor) -> Tensor:
    """Return a convolution's per-sample bias gradients ``(B, out-channels)``."""
    return b.flatten(2).sum(2)


def _flat_values(grads: Tensor, mask: ParamMask | None) -> Tensor:
    """Return fresh per-sample gradients ``grads`` as ``(B, n)`` rows, masked.

    Up to a quarter kept, the rows hold the kept coordinates only. Above that, gathering
    costs more than zeroing the dropped coordinates in place (for 8 x 2.4 M values on 2
    cores: 33 ms against 4 ms at 55% kept, 8.5 ms against 5.7 ms at 10%), and the rows
    keep every coordinate, zero where dropped. :func:`weighted_sums` reads either.
    """
    flat = grads.reshape(grads.shape[0], -1)
    if mask is None:
        return flat
    if mask.kept_index.numel() > _SELECT_MAX_SHARE * flat.shape[1]:
        return flat.mul_(~mask.dropped.view(1, -1))
    return flat.index_select(1, mask.kept_index)


def _squared_norms(values: Rows) -> Tensor:
    # The norm in the values' own precision, squared in float64: ten times faster on the
    # CPU than summing float64 squares, and as exact as the gradients themselves.
    if isinstance(values, list):
        norms = torch.cat([torch.linalg.vector_norm(row, dim=1) for row in values])
    else:
        norms = torch.linalg.vector_norm(values, dim=1)
    return norms.to(torch.float64).square()


def _rows_numel(values: Rows) -> int:
    return sum(row.numel() for row in values) if isinstance(values, list) else values.numel()


def _weighted_rows(factors: Tensor, values: Rows) -> Tensor:
    """Return ``sum_i f_i v_i`` over the rows ``v_i`` of ``values``, flat."""
    if not isinstance(values, list):
        return factors.to(values.dtype) @ values
    factors = factors.to(values[0].dtype)
    summed = values[0][0] * factors[0]
    for factor, row in zip(factors[1:], values[1:]):
        summed.addcmul_(row[0], factor)
    return summed
