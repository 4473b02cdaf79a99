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
arXiv 2110.05679) when that costs fewer multiply-adds than materialising the gradient
(see :func:`ghost_is_cheaper`). Deep, low-resolution layers take the ghost norm; the
others materialise their per-sample gradients by whichever of three kernels
:func:`conv_method` names fastest for the layer's shape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_LAYERS = (nn.Conv2d, nn.GroupNorm, nn.Linear)

# Thresholds of conv_method, from the measurements its docstring cites.
_UNFOLD_MAX_POSITIONS = 256
_GROUPED_MAX_FAN_IN = 1152
_LOOP_MIN_POSITIONS = 4096
_GHOST_MAX_COST_FRACTION = 0.25


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
    out_channels = dropped.shape[0]
    fan_in = dropped[0].numel()
    rows = torch.zeros(out_channels + 1, dtype=torch.int64, device=kept_index.device)
    rows[1:] = torch.bincount(kept_index // fan_in, minlength=out_channels).cumsum(0)
    return ParamMask(dropped=dropped, kept_index=kept_index, rows=rows, cols=kept_index % fan_in)


@dataclass
class LayerBook:
    """What one layer keeps between the backward pass and the clipped sum.

    Attributes:
        squared: float64 ``(B,)``, each example's squared gradient norm over the layer's
            own parameters, after the RS mask.
        values: per own parameter, the per-sample gradients flattened to ``(B, n)`` at
            the mask's kept coordinates (all coordinates without a mask), or None where
            the sum is recomputed from ``a`` and ``b``.
        a: the layer input, kept only if some value is None.
        b: the output gradient, kept only if some value is None.
    """

    squared: Tensor
    values: list[Tensor | None]
    a: Tensor | None = None
    b: Tensor | None = None

    @property
    def stored(self) -> int:
        """Number of tensor elements this book holds."""
        held = [v for v in self.values if v is not None] + [t for t in (self.a, self.b) if t is not None]
        return sum(t.numel() for t in held)


def ghost_is_cheaper(
    module: nn.Module, a: Tensor, b: Tensor, *, fraction: float = _GHOST_MAX_COST_FRACTION
) -> bool:
    """Return whether convolution ``module`` should take the ghost norm over materialising.

    A ghost-normed layer still computes its batched weight gradient for the clipped sum;
    a materialised one sums its per-sample gradients instead, which costs up to about a
    quarter more than the batched weight gradient (``conv_method``'s measurements). So
    the ghost norm wins when its multiply-adds, ``C P^2 + T^2 (k + p)`` per example (pixel
    Gram matrix, its ``k`` kernel-offset blocks, the output-gradient Gram matrix), are at
    most ``fraction`` (a quarter) of the weight gradient's ``T D p``. ``C`` in-channels, ``P`` padded
    input pixels, ``T`` output positions, ``k`` kernel area, ``D = C k``, ``p``
    out-channels.
    """
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return False
    positions = b.shape[2] * b.shape[3]
    pixels = (a.shape[2] + 2 * module.padding[0]) * (a.shape[3] + 2 * module.padding[1])
    area = module.kernel_size[0] * module.kernel_size[1]
    channels, out_channels = module.in_channels, module.out_channels
    ghost = channels * pixels**2 + positions**2 * (area + out_channels)
    return ghost <= fraction * positions * channels * area * out_channels


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
    if masks[0] is None and ghost_is_cheaper(module, a, b):
        return _ghost_book(module, a, b, masks)
    kept = b.shape[0] * sum(p.numel() if m is None else m.kept_index.numel() for p, m in zip(params, masks))
    if (
        masks[0] is None
        and kept > allowance
        and ghost_is_cheaper(module, a, b, fraction=1.0)
    ):
        # Keeping the input and output gradient takes less memory than the per-sample
        # gradients, or those do not fit: a ghost norm costing less than materialising
        # then trades a little time for memory.
        return _ghost_book(module, a, b, masks)
    values = _kept_values(module, a, b, masks, stats)
    squared = sum(_squared_norms(v) for v in values)
    if sum(v.numel() for v in values) <= allowance:
        return LayerBook(squared=squared, values=values)
    return LayerBook(squared=squared, values=[None] * len(params), a=a, b=b)


def _kept_values(
    module: nn.Module,
    a: Tensor,
    b: Tensor,
    masks: Sequence[ParamMask | None],
    stats: tuple[Tensor, Tensor] | None,
) -> list[Tensor]:
    """Return the per-sample gradients at the kept coordinates, ``(B, kept)`` per parameter."""
    if isinstance(module, nn.Conv2d) and _samples_kept_only(module, b, masks[0]):
        values = [_conv_sampled_weight(module, a, b, masks[0])]
        if module.bias is not None:
            values.append(_flat_values(b.flatten(2).sum(2), masks[1]))
        return values
    grads = per_sample_grads(module, a, b, stats=stats)
    return [_flat_values(grad, mask) for grad, mask in zip(grads, masks)]


def _samples_kept_only(module: nn.Conv2d, b: Tensor, mask: ParamMask | None) -> bool:
    """Return whether to compute a masked convolution's weight gradients at kept coordinates only.

    A sampled product (SDDMM) costs ``T`` multiply-adds per kept coordinate, at roughly
    7 G/s on the test machine's 2 cores, against the dense product's 10 G/s (4 x 4
    positions) to 80 G/s (16 x 16) for all coordinates. Measured at batch 8 and 10% kept:
    512 channels at 4 x 4 took 4.1 ms sampled against 28.5 ms dense, 256 at 8 x 8 2.7
    against 4.3 ms, 128 at 16 x 16 4.8 against 3.6 ms. Sampling pays while the kept
    fraction times the positions stays at most 8.
    """
    if mask is None or mask.rows is None or module.groups != 1:
        return False
    positions = b.shape[2] * b.shape[3]
    return mask.kept_index.numel() * positions <= 8 * mask.dropped.numel()


def _conv_sampled_weight(module: nn.Conv2d, a: Tensor, b: Tensor, mask: ParamMask) -> Tensor:
    """Per-sample weight gradients at the kept coordinates, by a sampled batched product."""
    batch = a.shape[0]
    patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    count = mask.cols.numel()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(
            mask.rows.expand(batch, -1), mask.cols.expand(batch, -1), a.new_zeros(batch, count),
            size=(batch, module.out_channels, patches.shape[1]), check_invariants=False,
        )
        product = torch.sparse.sampled_addmm(pattern, b.flatten(2), patches.transpose(1, 2), beta=0.0)
    return product.values().reshape(batch, count)


def _ghost_book(module: nn.Conv2d, a: Tensor, b: Tensor, masks: Sequence[ParamMask | None]) -> LayerBook:
    squared = _conv_ghost_squared_norms(module, a, b)
    values: list[Tensor | None] = [None]
    if module.bias is not None:
        bias = _flat_values(b.flatten(2).sum(2), masks[1])
        squared += _squared_norms(bias)
        values.append(bias)
    return LayerBook(squared=squared, values=values, a=a, b=b)


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
                grad.masked_fill_(mask.dropped, 0.0)
            sums.append(grad)
            continue
        summed = factors.to(values.dtype) @ values
        if mask is None:
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
        grads = [_conv_per_sample_weight(module, a, b)]
        if module.bias is not None:
            grads.append(b.flatten(2).sum(2))
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


def conv_method(module: nn.Conv2d, positions: int) -> str:
    """Return how :func:`per_sample_grads` materialises a convolution's weight gradients.

    ``unfold`` (unfold + bmm) below 256 output positions, ``grouped`` (one convolution
    with the batch as groups) for up to 1152 inputs per output (in-channels x kernel
    area) below 4096 positions, ``loop`` (one weight-gradient convolution per example)
    otherwise. Measured on a 2-core AMD EPYC at batch 8 over the ResNet34 U-Net's layer
    shapes at 128 and 256 px (BENCHMARKS.md): grouped kernels slow down with many input
    channels at low resolution (17 ms against 4.3 ms unfolded for 256 channels at 8 x 8),
    unfolding costs memory and time at high resolution, and per-example kernels beat
    even the batched weight gradient at 128 x 128 and above.
    """
    fan_in = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    if module.groups == 1 and positions < _UNFOLD_MAX_POSITIONS:
        return "unfold"
    if fan_in <= _GROUPED_MAX_FAN_IN and positions < _LOOP_MIN_POSITIONS:
        return "grouped"
    return "loop"


def _conv_per_sample_weight(module: nn.Conv2d, a: Tensor, b: Tensor) -> Tensor:
    batch = a.shape[0]
    shape = module.weight.shape
    method = conv_method(module, b.shape[2] * b.shape[3])
    if method == "unfold":
        patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
        return torch.bmm(b.flatten(2), patches.transpose(1, 2)).view(batch, *shape)
    if method == "loop":
        grads = module.weight.new_empty((batch, *shape))
        for i in range(batch):
            grads[i] = _conv_weight_grad(module, a[i : i + 1], b[i : i + 1], module.weight, module.groups)
        return grads
    # The weight only gives the kernel shape, so an expanded scalar serves.
    weight = a.new_empty(()).expand(batch * shape[0], *shape[1:])
    grads = _conv_weight_grad(
        module, a.reshape(1, -1, *a.shape[2:]), b.reshape(1, -1, *b.shape[2:]), weight,
        batch * module.groups,
    )
    return grads.view(batch, *shape)


def _conv_weight_grad(module: nn.Conv2d, a: Tensor, b: Tensor, weight: Tensor, groups: int) -> Tensor:
    return torch.ops.aten.convolution_backward(
        b, a, weight, None, list(module.stride), list(module.padding), list(module.dilation),
        False, [0, 0], groups, [False, True, False],
    )[1]


def group_norm_stats(output: Tensor) -> tuple[Tensor, Tensor] | None:
    """Return the (mean, 1/std) per example and group that made GroupNorm ``output``, if saved.

    Autograd saves them for the backward pass; reading them back saves recomputing
    statistics over the whole input, the slowest part of a GroupNorm's per-sample
    gradients at high resolution. None where the autograd node differs.
    """
    node = output.grad_fn
    if node is None or type(node).__name__ != "NativeGroupNormBackward0":
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()


def _group_norm_per_sample(
    module: nn.GroupNorm, a: Tensor, b: Tensor, stats: tuple[Tensor, Tensor] | None
) -> list[Tensor]:
    """Per-sample (weight, bias) gradients of an affine GroupNorm without normalising ``a``.

    The weight gradient of channel c is ``sum_x xhat * b = rstd_g (sum_x a b - mean_g sum_x b)``
    over the channel's positions x, for its group's mean and 1/std; this skips the
    full-size normalised tensor.
    """
    batch, channels = b.shape[:2]
    groups = module.num_groups
    if stats is None:
        var, mean = torch.var_mean(a.reshape(batch, groups, -1), dim=2, unbiased=False)
        rstd = (var + module.eps).rsqrt()
    else:
        mean, rstd = (t.reshape(batch, groups).to(a.dtype) for t in stats)
    rstd = rstd.repeat_interleave(channels // groups, dim=1)
    mean = mean.repeat_interleave(channels // groups, dim=1)
    flat_a, flat_b = a.reshape(batch, channels, -1), b.reshape(batch, channels, -1)
    bias = flat_b.sum(2)
    weight = rstd * (torch.einsum("ncx,ncx->nc", flat_a, flat_b) - mean * bias)
    return [weight, bias]


def _conv_ghost_squared_norms(module: nn.Conv2d, a: Tensor, b: Tensor) -> Tensor:
    """Return ``<A_i^T A_i, B_i^T B_i>`` per example, with ``A_i`` the unfolded input.

    The Gram matrix of the unfolded input is assembled from the Gram matrix of the
    padded input's pixels: two patches' inner product is the sum, over kernel offsets,
    of the inner products of the pixels at that offset. This skips unfolding (a copy
    of kernel-area times the input) and costs ``C P^2`` multiply-adds for ``P`` padded
    pixels instead of ``T^2 D``.
    """
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = (
        module.kernel_size, module.stride, module.dilation, module.padding
    )
    batch, _, out_h, out_w = b.shape
    padded = F.pad(a, (pw, pw, ph, ph)).flatten(2)
    height, width = a.shape[2] + 2 * ph, a.shape[3] + 2 * pw
    pixels = torch.bmm(padded.transpose(1, 2), padded).view(batch, height, width, height, width)
    gram_a = None
    for i in range(kh):
        rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
        for j in range(kw):
            cols = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            block = pixels[:, rows, cols, rows, cols]
            gram_a = block.clone() if gram_a is None else gram_a.add_(block)
    outputs = b.flatten(2)
    gram_b = torch.bmm(outputs.transpose(1, 2), outputs)
    return (gram_a.reshape_as(gram_b) * gram_b).sum((1, 2), dtype=torch.float64)


def _flat_values(grads: Tensor, mask: ParamMask | None) -> Tensor:
    flat = grads.reshape(grads.shape[0], -1)
    return flat if mask is None else flat.index_select(1, mask.kept_index)


def _squared_norms(values: Tensor) -> Tensor:
    # The norm in the values' own precision, squared in float64: ten times faster on the
    # CPU than summing float64 squares, and as exact as the gradients themselves.
    return torch.linalg.vector_norm(values, dim=1).to(torch.float64).square()
