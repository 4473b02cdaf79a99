"""Convolution kernels for per-sample gradients: which to use, and the kernels themselves.

Per-sample weight gradients of a convolution come from one of three kernels, which
:func:`conv_method` picks. Where :func:`ghost_is_cheaper`, their squared norms come from
the ghost norm (:func:`ghost_squared_norms`) instead. Under an RS mask, where
:func:`sampling_pays`, a sampled sparse product computes the kept coordinates only
(:func:`sampled_weight`), and where the per-sample gradients would not be kept, the
masked norms come without them (:func:`masked_squared_norms`). The kernel rules were
measured on the ResNet34 U-Net's layer shapes at batch 8, on a 2-core AMD EPYC, and the
masked norms on the ResNet18 U-Net's at 64 px on a 2-core Intel Xeon (BENCHMARKS.md).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.privacy.sparsify import keep_factors

# Thresholds of conv_method and ghost_is_cheaper, from the measurements their docstrings cite.
_UNFOLD_MAX_POSITIONS = 256
_GROUPED_MAX_FAN_IN = 1152
_LOOP_MIN_POSITIONS = 4096
_GHOST_MAX_COST_FRACTION = 0.25
MASKED_GHOST_MAX_POSITIONS = 4


def csr_pattern(dropped: Tensor, kept_index: Tensor) -> tuple[Tensor, Tensor]:
    """Return the kept coordinates of a convolution weight as CSR (row offsets, columns).

    The matrix is the weight viewed as ``(out-channels, in-channels x kernel area)``, and
    ``kept_index`` contains the flat kept indices in ascending order.
    """
    out_channels = dropped.shape[0]
    fan_in = dropped[0].numel()
    rows = torch.zeros(out_channels + 1, dtype=torch.int64, device=kept_index.device)
    rows[1:] = torch.bincount(kept_index // fan_in, minlength=out_channels).cumsum(0)
    return rows, kept_index % fan_in


def ghost_is_cheaper(
    module: nn.Module, a: Tensor, b: Tensor, *, fraction: float = _GHOST_MAX_COST_FRACTION
) -> bool:
    """Return whether convolution ``module`` should take the ghost norm over materialising.

    A ghost-normed layer still computes its batched weight gradient for the clipped sum.
    A materialised one sums its per-sample gradients instead, and computing those costs
    up to about a quarter more than the batched weight gradient (``conv_method``'s
    measurements). So
    the ghost norm wins when its multiply-adds, ``C P^2 + T^2 (k + p)`` per example (pixel
    Gram matrix, its ``k`` kernel-offset blocks, the output-gradient Gram matrix), are at
    most ``fraction`` (by default a quarter) of the weight gradient's ``T D p``. ``C``
    in-channels, ``P`` padded input pixels, ``T`` output positions, ``k`` kernel area,
    ``D = C k``, ``p`` out-channels.
    """
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return False
    positions = b.shape[2] * b.shape[3]
    pixels = (a.shape[2] + 2 * module.padding[0]) * (a.shape[3] + 2 * module.padding[1])
    area = module.kernel_size[0] * module.kernel_size[1]
    channels, out_channels = module.in_channels, module.out_channels
    ghost = channels * pixels**2 + positions**2 * (area + out_channels)
    return ghost <= fraction * positions * channels * area * out_channels


def conv_method(module: nn.Conv2d, positions: int) -> str:
    """Return the kernel :func:`per_sample_weight` uses for a convolution with ``positions`` outputs.

    ``unfold`` (unfold + bmm) below 256 output positions. ``grouped`` (one convolution
    with the batch as groups) below 4096 positions for up to 1152 inputs per output
    (in-channels x kernel area). ``loop`` (one weight-gradient convolution per example)
    otherwise. These thresholds come from timing every kernel on the ResNet34 U-Net's
    layer shapes at 128 and 256 px, batch 8, on a 2-core AMD EPYC. Grouped kernels slow
    down with many input channels at low resolution (17 ms against 4.3 ms unfolded for
    256 channels at 8 x 8). Unfolding costs memory and time at high resolution. At
    128 x 128 and above, per-example kernels beat even the batched weight gradient.
    """
    fan_in = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    if module.groups == 1 and positions < _UNFOLD_MAX_POSITIONS:
        return "unfold"
    if fan_in <= _GROUPED_MAX_FAN_IN and positions < _LOOP_MIN_POSITIONS:
        return "grouped"
    return "loop"


def per_sample_weight(module: nn.Conv2d, a: Tensor, b: Tensor) -> Tensor:
    """Return the per-sample weight gradients ``(B, *weight.shape)`` of convolution ``module``."""
    batch = a.shape[0]
    shape = module.weight.shape
    method = conv_method(module, b.shape[2] * b.shape[3])
    if method == "unfold":
        patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
        return torch.bmm(b.flatten(2), patches.transpose(1, 2)).view(batch, *shape)
    if method == "loop":
        return torch.stack(per_example_weights(module, a, b))
    # The weight only gives the kernel shape, so an expanded scalar serves.
    weight = a.new_empty(()).expand(batch * shape[0], *shape[1:])
    grads = weight_grad(
        module, a.reshape(1, -1, *a.shape[2:]), b.reshape(1, -1, *b.shape[2:]), weight,
        batch * module.groups,
    )
    return grads.view(batch, *shape)


def per_example_weights(module: nn.Conv2d, a: Tensor, b: Tensor) -> list[Tensor]:
    """Return each example's weight gradient of convolution ``module``, one convolution each.

    This is :func:`per_sample_weight`'s ``loop`` kernel without the stacking, for callers
    that can use the tensors as they come: at 256 px, copying them into one tensor took
    about a fifth of the kernel's time in the training step.
    """
    return [weight_grad(module, a[i : i + 1], b[i : i + 1], module.weight, module.groups) for i in range(a.shape[0])]


def weight_grad(module: nn.Conv2d, a: Tensor, b: Tensor, weight: Tensor, groups: int) -> Tensor:
    """Return the weight gradient of ``module``'s convolution for ``weight``'s shape and ``groups``."""
    return torch.ops.aten.convolution_backward(
        b, a, weight, None, list(module.stride), list(module.padding), list(module.dilation),
        False, [0, 0], groups, [False, True, False],
    )[1]


def sampling_pays(module: nn.Conv2d, b: Tensor, kept: int, total: int) -> bool:
    """Return whether to compute ``kept`` of a weight's ``total`` coordinates alone, sampled.

    The sampled product (SDDMM) on the CPU costs more per kept coordinate than its
    ``T`` multiply-adds suggest, and more the larger the kept share: for 512 channels at
    2 x 2 positions (batch 8) it took 22 ms at 10% kept, 45 ms at 20% and 174 ms at 55%,
    against 32 to 54 ms for the dense per-sample product and a selection. At 4 x 4 it
    took 4.2 ms at 10% kept and 14 ms at 25%, against 35 to 37 ms dense. At 8 x 8 it
    took 11 ms at 10% kept, against 44 ms.

    So sampling is used up to 12% kept at fewer than 16 output
    positions (a rate-0.9 mask keeps about 10% of each layer, a little more or less),
    and otherwise up to 20% kept while the kept share times the positions stays at most
    8 (the dense product gets cheaper per coordinate as ``T`` grows).
    """
    if module.groups != 1:
        return False
    positions = b.shape[2] * b.shape[3]
    share = kept / total
    return share <= (0.12 if positions < 16 else 0.2) and share * positions <= 8


def sampled_weight(module: nn.Conv2d, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Return per-sample weight gradients ``(B, kept)`` at the CSR pattern ``rows``, ``cols``.

    The pattern is over the ``(out-channels, in-channels x kernel area)`` weight matrix
    (see :func:`csr_pattern`), and one sampled batched product (SDDMM) computes them.
    """
    batch = a.shape[0]
    patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    count = cols.numel()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(
            rows.expand(batch, -1), cols.expand(batch, -1), a.new_zeros(batch, count),
            size=(batch, module.out_channels, patches.shape[1]), check_invariants=False,
        )
        product = torch.sparse.sampled_addmm(pattern, b.flatten(2), patches.transpose(1, 2), beta=0.0)
    # values() is a view whose base is the whole sparse result, int64 column indices
    # included (twice the values' size); a copy lets them go.
    return product.values().reshape(batch, count).clone()


def ghost_squared_norms(module: nn.Conv2d, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Return an upper bound of ``<A_i^T A_i, B_i^T B_i>`` per example, and its :func:`spread`.

    ``A_i`` is the unfolded input. Its Gram matrix is assembled from the Gram matrix of
    the padded input's pixels: two patches' inner product is the sum, over kernel
    offsets, of the inner products of the pixels at that offset. This skips unfolding (a
    copy of kernel-area times the input) and costs ``C P^2`` multiply-adds for ``P``
    padded pixels instead of ``T^2 D``.

    The bound adds the worst-case rounding ``gamma W^2`` of the Gram matrices (in the
    inputs' precision) and their products (summed in float64), for ``W`` the
    :func:`spread`. Without it, an input with a large common offset and output gradients
    that cancel over the positions gave negative float32 squared norms: the norm was NaN
    and the example went unclipped (a contribution of norm 558 for a bound of 1). On the
    benchmark batch the bound raised whole-model norms by 0.002% for the ResNet34 U-Net
    at 128 px and by 0.2% for the ResNet18 U-Net at 64 px. Float64 Grams would cost more:
    18.5 ms against 11.6 ms per 128 px step.
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
    gram_a = gram_a.reshape_as(gram_b)
    squared = (gram_a * gram_b).sum((1, 2), dtype=torch.float64)
    # The diagonals are the squared norms of the patches and output gradients: W for free.
    diagonals = gram_a.diagonal(dim1=1, dim2=2).double() * gram_b.diagonal(dim1=1, dim2=2).double()
    spread_ = diagonals.sqrt().sum(1)
    # Twice the term counts also cover the rounding of W itself.
    gram_terms = module.in_channels + kh * kw + module.out_channels + 2
    gamma = rounding_factor(2 * gram_terms, a.dtype) + rounding_factor(2 * (out_h * out_w) ** 2, torch.float64)
    return squared + gamma * spread_.square(), spread_


def spread(module: nn.Conv2d, a: Tensor, b: Tensor) -> Tensor:
    """Return ``W_i = sum_t ||A_i[:, t]|| ||B_i[:, t]||`` per example (float64).

    ``A_i[:, t]`` is the input patch of output position ``t`` (over all in-channels)
    and ``B_i[:, t]`` the output gradient there. However much its terms cancel, example
    ``i``'s weight gradient computed as sums of ``n`` products over the positions has a
    rounding error of norm at most ``gamma_n W_i``.
    """
    # Channel sums first, in the inputs' precision: a float64 copy of a high-resolution
    # input would add to the step's peak memory. The factor covers their rounding.
    pixels = a.square().sum(1, keepdim=True).double()
    window = pixels.new_ones(1, 1, *module.kernel_size)
    patches = F.conv2d(pixels, window, stride=module.stride, padding=module.padding, dilation=module.dilation)
    outputs = b.square().sum(1).double()
    margin = 1 + rounding_factor(max(module.in_channels, module.out_channels) + 2, a.dtype)
    return (patches[:, 0] * outputs).sqrt().flatten(1).sum(1) * margin


def rounding_factor(terms: int, dtype: torch.dtype) -> float:
    """Return ``gamma_n = n u / (1 - n u)``, the worst-case relative rounding of ``n`` terms in ``dtype``.

    ``u`` is the unit roundoff. This is the standard worst-case bound for a sum of ``n``
    products, relative to the sum of their absolute values, in any summation order and
    with or without fused multiply-adds.
    """
    share = terms * torch.finfo(dtype).eps / 2
    if share >= 1:
        raise ValueError(f"{terms} terms exceed the precision of {dtype}")
    return share / (1 - share)


def masked_squared_norms(
    module: nn.Conv2d, a: Tensor, b: Tensor, dropped: Tensor
) -> tuple[Tensor, Tensor]:
    """Return ``||m * g_i||^2`` per example for the weight of ``module`` and its :func:`spread`.

    ``m = ~dropped`` is the weight's RS mask. Neither kernel materialises the batch's
    per-sample gradients (``B`` times the weight's size). At low resolution that is far
    more memory than the activations, and writing and reading it bounds the time.

    - At most 4 output positions (``groups == 1``): a masked ghost norm, an upper bound
      (:func:`_masked_ghost_norms`). It took 3.0 ms against 20 to 25 ms for the dense or
      sampled per-sample gradients of a 512-channel 2 x 2 layer (batch 8, rate 0.45 or
      0.9).
    - Otherwise: one example's gradient at a time, masked and normed while it is in
      cache. It took 6.2 ms against 21 ms for 768 to 256 channels at 4 x 4 (rate 0.45).

    Both were measured on a 2-core Intel Xeon.
    """
    positions = b.shape[2] * b.shape[3]
    if module.groups == 1 and positions <= MASKED_GHOST_MAX_POSITIONS:
        return _masked_ghost_norms(module, a, b, dropped)
    keep = keep_factors(dropped, a.dtype)
    norms = [torch.linalg.vector_norm(grad.mul_(keep)) for grad in _per_example_grads(module, a, b)]
    # As for the other per-sample norms: taken in the gradients' precision, squared in float64.
    return torch.stack(norms).to(torch.float64).square(), spread(module, a, b)


def _masked_ghost_norms(module: nn.Conv2d, a: Tensor, b: Tensor, dropped: Tensor) -> tuple[Tensor, Tensor]:
    """Return upper bounds of the masked squared norms from products of output positions, and the :func:`spread`.

    With ``A_i`` the unfolded input (``D x T``) and ``B_i`` the output gradient
    (``p x T``), ``||m * B_i A_i^T||^2 = sum_o sum_{t, u} B_i[o, t] B_i[o, u] M_i[o, (t, u)]``
    for ``M_i = m (A_i[:, t] * A_i[:, u])``: one product of the mask (``p x D``) with the
    ``T (T + 1) / 2`` position pairs of every example. It costs ``(T + 1) / 2`` times the
    multiply-adds of the per-sample gradients but writes ``p T^2`` values per example
    instead of ``p D``, so it pays for few positions ``T``.
    """
    batch, out_channels = b.shape[:2]
    wide = torch.float64  # as for the ghost norm: float32 cancels to negative norms
    patches = F.unfold(a.to(wide), module.kernel_size, module.dilation, module.padding, module.stride)
    positions = patches.shape[2]
    first, second = torch.triu_indices(positions, positions, device=a.device)
    input_pairs = (patches[:, :, first] * patches[:, :, second]).transpose(0, 1).reshape(patches.shape[1], -1)
    keep = keep_factors(dropped, wide).view(out_channels, -1)
    kept_pairs = (keep @ input_pairs).view(out_channels, batch, -1).transpose(0, 1)
    outputs = b.flatten(2).to(wide)
    # Each pair t < u stands for both orders.
    order = torch.where(first == second, 1.0, 2.0).to(device=a.device, dtype=wide)
    output_pairs = outputs[:, :, first] * outputs[:, :, second] * order
    squared = (kept_pairs * output_pairs).sum((1, 2))
    spread_ = (patches.square().sum(1) * outputs.square().sum(1)).sqrt().sum(1)
    # Twice the term count also covers the rounding of W itself.
    gamma = rounding_factor(2 * (patches.shape[1] + out_channels * positions**2 + 4), wide)
    return squared + gamma * spread_.square(), spread_


def _per_example_grads(module: nn.Conv2d, a: Tensor, b: Tensor):
    """Yield each example's weight gradient of ``module``, shaped like the weight."""
    if conv_method(module, b.shape[2] * b.shape[3]) != "unfold":
        for i in range(a.shape[0]):
            yield weight_grad(module, a[i : i + 1], b[i : i + 1], module.weight, module.groups)
        return
    patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    outputs = b.flatten(2)
    for i in range(a.shape[0]):
        yield torch.mm(outputs[i], patches[i].T).view(module.weight.shape)
