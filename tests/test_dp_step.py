"""DP-SGD pieces: per-sample gradients, clipping, sparsification, noise, the composed step.

Exactness checks run in float64 so that rounding cannot flip a ReLU and change a
gradient; "exact" then means agreement to 1e-9 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from common.metrics import dice_bce_loss
from common.model import build_unet
from common.privacy.clipping import (
    AdaptiveClipBound,
    adaptive_noise_multiplier,
    automatic_clip_factor,
    flat_clip_factor,
)
from common.privacy.noise import NoiseSource, poisson_sample
from common.privacy.per_sample import STRATEGIES, GhostStrategy, make_strategy
from common.privacy.sparsify import (
    draw_mask,
    mask_seed,
    num_zeroed,
    rs_num_windows,
    rs_rate,
    rs_window,
)
from common.privacy.step import DPStep

EXACT = 1e-9


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(encoder="resnet18", encoder_depth=2, decoder_channels=(8, 8)).double()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 1, 16, 16, generator=generator, dtype=torch.float64)
    targets = (torch.rand(4, 1, 16, 16, generator=generator) > 0.7).double()
    targets[0] = 0  # one negative image
    return images, targets


@pytest.fixture(scope="module")
def reference(model, batch) -> list[list[torch.Tensor]]:
    """Per-sample gradients by plain autograd, one example at a time."""
    images, targets = batch
    params = [p for p in model.parameters()]
    return [
        list(torch.autograd.grad(dice_bce_loss(model(images[i : i + 1]), targets[i : i + 1]).sum(), params))
        for i in range(len(images))
    ]


def masked(grads, mask):
    return grads if mask is None else [g.masked_fill(~k, 0.0) for g, k in zip(grads, mask.kept)]


def norm_of(grads) -> torch.Tensor:
    return torch.sqrt(sum(g.pow(2).sum() for g in grads))


def relative_error(got, expected) -> float:
    top = max(float(e.abs().max()) for e in expected)
    return max(float((g - e).abs().max()) for g, e in zip(got, expected)) / top


def clipped_sum(name, model, batch, clip, mask=None, strategy=None):
    own = strategy is None
    strategy = make_strategy(name, model, dice_bce_loss) if own else strategy
    try:
        out, stats = strategy.clipped_sum(*batch, clip=clip, mask=mask)
    finally:
        if own:
            strategy.close()
    return out, stats


STRATEGY_VARIANTS = [(name, None) for name in STRATEGIES] + [("ghost", 0), ("ghost", 3000)]


@pytest.mark.parametrize(
    "name, budget", STRATEGY_VARIANTS,
    ids=[name if budget is None else f"{name}-budget-{budget}" for name, budget in STRATEGY_VARIANTS],
)
@pytest.mark.parametrize("rate", [None, 0.7])
def test_strategy_equals_single_example_loop(name, budget, rate, model, batch, reference):
    """Every strategy, and book-keeping with no or little memory to keep per-sample gradients."""
    mask = None
    if rate is not None:
        mask = draw_mask([p.shape for p in model.parameters()], rate=rate, generator=torch.Generator().manual_seed(3))
    clip = lambda norms: flat_clip_factor(norms, max_grad_norm=0.3)  # noqa: E731
    strategy = None
    if budget is not None:
        strategy = GhostStrategy(model, dice_bce_loss, memory_budget=budget)
    out, stats = clipped_sum(name, model, batch, clip, mask, strategy=strategy)
    if strategy is not None:
        strategy.close()
    per_sample = [masked(g, mask) for g in reference]
    norms = torch.stack([norm_of(g) for g in per_sample])
    factors = clip(norms)
    expected = [
        sum(factors[i] * per_sample[i][k] for i in range(len(per_sample)))
        for k in range(len(per_sample[0]))
    ]
    assert torch.allclose(stats.norms, norms, rtol=EXACT, atol=0)
    assert relative_error(out, expected) < EXACT


@pytest.mark.parametrize(
    "name, budget", STRATEGY_VARIANTS,
    ids=[name if budget is None else f"{name}-budget-{budget}" for name, budget in STRATEGY_VARIANTS],
)
@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_clipped_sum_is_zero_where_masked(name, budget, rate, model, batch):
    """The step adds no noise at masked coordinates, so a strategy must leave them exactly 0.

    Rate 0.9 takes the sampled product and the selected kept coordinates, rate 0.5 the
    zeroing in place, and budget 0 the recomputed weight gradient.
    """
    mask = draw_mask([p.shape for p in model.parameters()], rate=rate, generator=torch.Generator().manual_seed(6))
    strategy = None if budget is None else GhostStrategy(model, dice_bce_loss, memory_budget=budget)
    clip = lambda norms: flat_clip_factor(norms, max_grad_norm=0.3)  # noqa: E731
    out, _ = clipped_sum(name, model, batch, clip, mask, strategy=strategy)
    if strategy is not None:
        strategy.close()
    assert sum(int(torch.count_nonzero(g[~k])) for g, k in zip(out, mask.kept)) == 0


@pytest.mark.parametrize("name", STRATEGIES)
def test_flat_contribution_norm_at_most_clip(name, model, batch, reference):
    images, targets = batch
    strategy = make_strategy(name, model, dice_bce_loss)
    for i in (0, 1):
        original = float(norm_of(reference[i]))
        assert 1e-3 < original < 10.0  # so one bound clips and the other does not
        for bound in (1e-3, 10.0):
            one = (images[i : i + 1], targets[i : i + 1])
            clip = lambda n: flat_clip_factor(n, max_grad_norm=bound)  # noqa: E731
            out, _ = clipped_sum(name, model, one, clip, strategy=strategy)
            contribution = float(norm_of(out))
            assert contribution <= bound * (1 + 1e-12)
            assert contribution == pytest.approx(min(bound, original), rel=EXACT)
    strategy.close()


@pytest.mark.parametrize("name", STRATEGIES)
def test_automatic_contribution_is_exact(name, model, batch, reference):
    images, targets = batch
    bound, gamma = 2.0, 0.01
    clip = lambda n: automatic_clip_factor(n, max_grad_norm=bound, gamma=gamma)  # noqa: E731
    strategy = make_strategy(name, model, dice_bce_loss)
    for i in (0, 1):
        out, _ = clipped_sum(name, model, (images[i : i + 1], targets[i : i + 1]), clip, strategy=strategy)
        original = float(norm_of(reference[i]))
        assert float(norm_of(out)) == pytest.approx(bound * original / (original + gamma), rel=EXACT)
    strategy.close()


def layer_reference(layer, inputs):
    """Per-sample gradients of sum(layer(x) * w) for a fixed random w, one example at a time."""
    weights = torch.randn_like(layer(inputs))
    grads = []
    for i in range(len(inputs)):
        out = (layer(inputs[i : i + 1]) * weights[i : i + 1]).sum()
        grads.append(torch.autograd.grad(out, list(layer.parameters())))
    return weights, grads


@pytest.mark.parametrize(
    "layer, size",
    [
        (torch.nn.Conv2d(32, 64, 3, padding=1), 2),  # ghost norm (4 positions)
        (torch.nn.Conv2d(2, 3, 3, padding=1, dilation=1, bias=False), 4),  # unfolded
        (torch.nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2), 16),  # grouped (64 positions)
        (torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), 4),  # grouped, conv groups
        (torch.nn.Conv2d(2, 3, 3, padding=1), 64),  # one convolution per example (4096 positions)
        (torch.nn.GroupNorm(2, 6), 4),
        (torch.nn.Linear(6, 3), 4),
    ],
    ids=["conv-ghost", "conv-unfold", "conv-grouped", "conv-groups", "conv-loop", "groupnorm", "linear"],
)
def test_layer_books_and_weighted_sums(layer, size):
    """Each layer's books (kept values or kept input and output gradient) give exact sums."""
    from common.privacy import conv_grads, layer_grads

    torch.manual_seed(0)
    layer = layer.double()
    if isinstance(layer, torch.nn.Linear):
        inputs = torch.randn(3, 4, 6, dtype=torch.float64)
    else:
        channels = layer.in_channels if isinstance(layer, torch.nn.Conv2d) else 6
        inputs = torch.randn(3, channels, size, size, dtype=torch.float64) + 0.5
    weights, grads = layer_reference(layer, inputs)
    own = list(layer.parameters())
    factors = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    # A convolution weight at 10% kept takes the sampled product, at 40% the dense one.
    for kept_share in (0.1, 0.4):
        masks = _random_masks(own, kept_share)
        if isinstance(layer, torch.nn.Conv2d):
            masks[0] = layer_grads.conv_mask(masks[0].dropped, masks[0].kept_index)
            sampled = conv_grads.sampling_pays(
                layer, layer(inputs), masks[0].kept_index.numel(), masks[0].dropped.numel()
            )
            positions = layer(inputs)[0, 0].numel()
            expected_sampled = kept_share == 0.1 and layer.groups == 1 and positions < 4096
            assert sampled == expected_sampled
        for param_masks in ([None] * len(own), masks):
            _check_books(layer, inputs, weights, grads, factors, param_masks)


def _random_masks(params, kept_share: float) -> list:
    """Masks keeping exactly ``floor(kept_share * numel)`` (at least one) random coordinates of each parameter."""
    from common.privacy import layer_grads

    generator = torch.Generator().manual_seed(3)
    masks = []
    for param in params:
        count = max(1, int(kept_share * param.numel()))
        kept_index = torch.randperm(param.numel(), generator=generator)[:count].sort().values
        dropped = torch.ones(param.numel(), dtype=torch.bool)
        dropped[kept_index] = False
        masks.append(layer_grads.ParamMask(dropped=dropped.view(param.shape), kept_index=kept_index))
    return masks


def _check_books(layer, inputs, weights, grads, factors, param_masks) -> None:
    from common.privacy import conv_grads, layer_grads

    own = list(layer.parameters())
    keep = [torch.ones_like(p, dtype=torch.bool) if m is None else ~m.dropped for p, m in zip(own, param_masks)]
    expected_sq = torch.stack([sum((g * k).pow(2).sum() for g, k in zip(per, keep)) for per in grads])
    expected_sums = [sum(factors[i] * grads[i][j] * keep[j] for i in range(3)) for j in range(len(own))]
    for allowance in (0, 10**9):
        book = layer_grads.book_layer(layer, inputs, weights, param_masks, allowance=allowance)
        assert torch.allclose(book.squared, expected_sq, rtol=EXACT, atol=0)
        assert (book.a is None) == all(v is not None for v in book.values)
        ghost = param_masks[0] is None and conv_grads.ghost_is_cheaper(layer, inputs, weights)
        masked_ghost = (
            param_masks[0] is not None
            and isinstance(layer, torch.nn.Conv2d)
            and layer.groups == 1
            and weights[0, 0].numel() <= conv_grads.MASKED_GHOST_MAX_POSITIONS
        )
        assert (book.values[0] is None) == (ghost or masked_ghost or allowance == 0)
        out = layer_grads.weighted_sums(layer, book, factors, param_masks)
        for got, expected in zip(out, expected_sums):
            assert torch.allclose(got, expected, rtol=EXACT, atol=1e-12)


@pytest.mark.parametrize(
    "conv, size",
    [
        (torch.nn.Conv2d(3, 4, 3, padding=1), 5),
        (torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), 7),
        (torch.nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1)), 6),
        (torch.nn.Conv2d(2, 3, 1, stride=2), 5),
        (torch.nn.Conv2d(1, 2, 7, stride=2, padding=3), 9),
    ],
    ids=["3x3", "stride-2", "dilated-rectangular", "1x1-stride-2", "7x7-stride-2"],
)
def test_conv_ghost_norm_from_pixel_gram(conv, size):
    from common.privacy import conv_grads, layer_grads

    torch.manual_seed(0)
    conv = conv.double()
    inputs = torch.randn(3, conv.in_channels, size, size, dtype=torch.float64)
    weights, grads = layer_reference(conv, inputs)
    expected = torch.stack([per[0].pow(2).sum() for per in grads])
    got, _ = conv_grads.ghost_squared_norms(conv, inputs, weights)
    assert torch.allclose(got, expected, rtol=EXACT, atol=0)
    assert bool((got >= expected).all())  # an upper bound, rounding included


@pytest.mark.parametrize(
    "conv, size",
    [
        (torch.nn.Conv2d(3, 4, 3, padding=1), 2),  # masked ghost norm, 4 positions
        (torch.nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(2, 0), dilation=(2, 1)), 3),  # 3 positions
        (torch.nn.Conv2d(3, 2, 1), 1),  # 1 position
        (torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), 7),  # per example, unfolded (16 positions)
        (torch.nn.Conv2d(2, 3, 3, padding=1), 16),  # per example, one convolution each (256 positions)
        (torch.nn.Conv2d(4, 6, 3, padding=1, groups=2), 2),  # conv groups: per example
    ],
    ids=["ghost-3x3", "ghost-dilated-rectangular", "ghost-1x1", "unfold-stride-2", "convolution", "groups"],
)
def test_conv_masked_norms(conv, size):
    """Squared norms of the masked per-sample weight gradients, without keeping them."""
    from common.privacy import conv_grads

    torch.manual_seed(0)
    conv = conv.double()
    inputs = torch.randn(3, conv.in_channels, size, size, dtype=torch.float64)
    weights, grads = layer_reference(conv, inputs)
    dropped = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    expected = torch.stack([per[0].masked_fill(dropped, 0.0).pow(2).sum() for per in grads])
    got, spread = conv_grads.masked_squared_norms(conv, inputs, weights, dropped)
    assert torch.allclose(got, expected, rtol=EXACT, atol=0)
    patches = torch.nn.functional.unfold(inputs, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    expected_spread = (patches.norm(dim=1) * weights.flatten(2).norm(dim=1)).sum(1)
    assert torch.allclose(spread, expected_spread, rtol=EXACT, atol=0)


def test_sampled_weight_keeps_only_its_values():
    """RS's sampled product gives the kept per-sample gradients and frees its column indices.

    The sparse result's int64 column indices take twice the values' memory. A view of its
    values would keep them alive for the whole backward pass.
    """
    from common.privacy import conv_grads, layer_grads

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    a = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    b = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    kept = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.7
    mask = layer_grads.conv_mask(~kept, torch.nonzero(kept.flatten()).flatten())
    values = conv_grads.sampled_weight(conv, a, b, mask.rows, mask.cols)
    dense = layer_grads.per_sample_grads(conv, a, b)[0].reshape(3, -1)[:, mask.kept_index]
    assert values.shape == (3, int(kept.sum()))
    assert torch.allclose(values, dense, rtol=EXACT, atol=1e-12)
    assert values._base is None
    assert values.untyped_storage().nbytes() == values.numel() * values.element_size()


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("rate", [None, 0.5])
def test_cancelling_gradients_stay_clipped(offset, rate):
    """Float32 Gram norms of an input with a large offset and cancelling output gradients.

    The per-sample gradient is small against its terms. Ghost norms (no mask) and masked
    ghost norms (rate 0.5, 4 positions) computed in float32 came out negative, and the
    NaN norm left the example unclipped: a contribution of norm 558 for a bound of 1.
    """
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(256, 256, 1, bias=False)
    model = torch.nn.Sequential(conv)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 2, 2).expand(1, 256, 2, 2).contiguous()
    mask = None
    if rate is not None:
        mask = draw_mask([conv.weight.shape], rate=rate, generator=torch.Generator().manual_seed(1))
    strategy = GhostStrategy(model, lambda out, target: (out * target).flatten(1).sum(1))
    largest = 0.0
    for seed in range(5):
        inputs = offset + torch.randn(1, 256, 2, 2, generator=torch.Generator().manual_seed(seed))
        out, stats = strategy.clipped_sum(
            inputs, signs, clip=lambda norms: flat_clip_factor(norms, max_grad_norm=1.0), mask=mask
        )
        assert bool(torch.isfinite(stats.norms).all())
        largest = max(largest, float(torch.linalg.vector_norm(out[0])))
    strategy.close()
    assert largest <= 1.0 + 1e-6


def test_clip_factors_edge_cases():
    norms = torch.tensor([0.0, 0.5, 2.0, math.nan, math.inf], dtype=torch.float64)
    assert flat_clip_factor(norms, max_grad_norm=1.0).tolist() == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert automatic_clip_factor(norms, max_grad_norm=1.0, gamma=0.0).tolist() == [0.0, 2.0, 0.5, 0.0, 0.0]
    assert automatic_clip_factor(norms, max_grad_norm=1.0, gamma=0.5).tolist() == [2.0, 1.0, 0.4, 0.0, 0.0]
    with pytest.raises(ValueError, match="max_grad_norm must be a positive finite number, got 0"):
        flat_clip_factor(norms, max_grad_norm=0)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0, got -1"):
        automatic_clip_factor(norms, max_grad_norm=1.0, gamma=-1)


@pytest.mark.parametrize(
    ("rate", "d", "expected"),
    [(0.9, 1000, 900), (0.5, 7, 3), (0.3, 10, 3), (0.29, 100, 29), (0.0, 5, 0), (0.999, 10_001, 9990)],
)
def test_mask_zeroes_exactly_floor_pd(rate, d, expected):
    shapes = [torch.Size([d - d // 3]), torch.Size([d // 3])]
    mask = draw_mask(shapes, rate=rate, generator=torch.Generator().manual_seed(0))
    zeroed = sum(int((~k).sum()) for k in mask.kept)
    assert zeroed == expected == mask.num_zeroed == num_zeroed(rate, d)
    assert [k.shape for k in mask.kept] == shapes


def test_mask_is_uniform_across_layers():
    # A uniform subset hits each layer in proportion to its size. The masked share of a
    # layer of n coordinates has std sqrt(p(1-p)/n), below 0.002 here, so allow 0.02.
    shapes = [torch.Size([100_000]), torch.Size([20, 1000]), torch.Size([50_000])]
    mask = draw_mask(shapes, rate=0.9, generator=torch.Generator().manual_seed(5))
    for kept in mask.kept:
        assert float((~kept).double().mean()) == pytest.approx(0.9, abs=0.02)


@pytest.mark.parametrize("rate", [0.3, 0.9])  # draws the zeroed side, then the kept side
def test_mask_coordinates_equally_likely(rate):
    """Every coordinate is zeroed with probability floor(p d) / d, wherever it lies.

    Over 2000 masks a coordinate's zeroed share has std at most 0.011, so allow 0.05.
    """
    shapes = [torch.Size([30]), torch.Size([4, 5])]
    generator = torch.Generator().manual_seed(8)
    counts = torch.zeros(50)
    for _ in range(2000):
        mask = draw_mask(shapes, rate=rate, generator=generator)
        counts += torch.cat([(~kept).flatten().float() for kept in mask.kept])
    share = num_zeroed(rate, 50) / 50
    assert float((counts / 2000 - share).abs().max()) < 0.05
    assert float(counts.sum()) == 2000 * num_zeroed(rate, 50)


def test_mask_drawn_in_blocks_is_uniform(monkeypatch):
    """Drawn block by block, every subset of floor(p d) zeroed coordinates is equally likely.

    d = 6 in blocks of 4 and 2, 3 zeroed: 20 subsets, 200 expected draws each out of 4000.
    A chi-square statistic above 50 (19 degrees of freedom) has probability 1.3e-4 for a
    uniform draw. A draw that split the count in proportion to the block sizes would never
    yield 8 of the subsets.
    """
    from common.privacy import sparsify

    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 4)
    generator = torch.Generator().manual_seed(11)
    seen: dict[tuple[bool, ...], int] = {}
    for _ in range(4000):
        mask = draw_mask([torch.Size([6])], rate=0.5, generator=generator)
        key = tuple(mask.kept[0].tolist())
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == math.comb(6, 3)
    assert sum((count - 200) ** 2 / 200 for count in seen.values()) < 50


def test_mask_depends_only_on_seed():
    shapes = [torch.Size([500])]
    seed = mask_seed(seed=1, server_round=2, site=3, window=1)
    first = draw_mask(shapes, rate=0.5, generator=torch.Generator().manual_seed(seed))
    again = draw_mask(shapes, rate=0.5, generator=torch.Generator().manual_seed(seed))
    other = mask_seed(seed=1, server_round=2, site=4, window=1)
    assert torch.equal(first.kept[0], again.kept[0])
    assert seed != other


def test_seeded_mask_reused_for_upload():
    """Training and the sparse upload ask for the same mask; it is drawn once."""
    from common.privacy.sparsify import seeded_mask

    shapes = [torch.Size([3, 4]), torch.Size([50])]
    first = seeded_mask(shapes, rate=0.4, seed=11)
    drawn = draw_mask(shapes, rate=0.4, generator=torch.Generator().manual_seed(11))
    assert seeded_mask(list(shapes), rate=0.4, seed=11) is first
    assert all(torch.equal(a, b) for a, b in zip(first.kept, drawn.kept))
    other = seeded_mask(shapes, rate=0.4, seed=12)
    assert other is not first
    assert not all(torch.equal(a, b) for a, b in zip(first.kept, other.kept))
    assert seeded_mask(shapes, rate=0.5, seed=11).num_zeroed == 31


def test_ramp_hits_stated_values():
    assert [rs_rate(k, num_windows=5, final_rate=0.9) for k in range(5)] == pytest.approx(
        [0.0, 0.225, 0.45, 0.675, 0.9]
    )
    assert rs_rate(0, num_windows=1, final_rate=0.9) == 0.9  # a single window cannot ramp
    with pytest.raises(ValueError, match="window must lie in \\[0, 5\\), got 5"):
        rs_rate(5, num_windows=5, final_rate=0.9)


def test_ramp_windows_span_all_local_epochs():
    assert rs_num_windows(num_server_rounds=3, local_epochs=2, refresh="round") == 3
    assert rs_num_windows(num_server_rounds=3, local_epochs=2, refresh="epoch") == 6
    assert rs_window(server_round=3, local_epoch=1, local_epochs=2, refresh="round") == 2
    assert rs_window(server_round=3, local_epoch=1, local_epochs=2, refresh="epoch") == 5
    with pytest.raises(ValueError, match="refresh must be one of round, epoch"):
        rs_window(server_round=1, local_epoch=0, local_epochs=1, refresh="step")


def make_step(model, method, *, sigma=1.0, bound=1.0, expected=4.0, seed=0, strategy="ghost", adaptive=None):
    return DPStep(
        model, dice_bce_loss, method=method, noise_multiplier=sigma, max_grad_norm=bound,
        expected_batch_size=expected, source=NoiseSource(seed=seed), strategy=strategy,
        adaptive=adaptive,
    )


def test_rs_at_rate_zero_equals_flat(model, batch):
    """A mask that zeroes nothing (the ramp's first window) gives flat clipping's gradient."""
    mask = draw_mask([p.shape for p in model.parameters()], rate=0.0, generator=torch.Generator().manual_seed(2))
    assert mask.num_zeroed == 0
    results = []
    for method in ("flat", "rs"):
        step = make_step(model, method, bound=0.3, seed=5)
        if method == "rs":
            step.set_mask(mask)
        step(*batch)
        results.append([p.grad.clone() for p in step.params])
        step.close()
    flat_grads, rs_grads = results
    for rs_grad, flat_grad in zip(rs_grads, flat_grads):
        assert torch.equal(rs_grad, flat_grad)


@pytest.mark.parametrize("method", ["rs", "rs-automatic"])
def test_rs_step_masked_coordinates_carry_nothing(method, model, batch, reference):
    step = make_step(model, method)
    mask = draw_mask([p.shape for p in step.params], rate=0.9, generator=torch.Generator().manual_seed(2))
    step.set_mask(mask)
    try:
        step(*batch)
        grads = [p.grad.clone() for p in step.params]
    finally:
        step.close()
    zero = sum(int((g == 0).sum()) for g in grads)
    on_mask = sum(int((g[~k] == 0).sum()) for g, k in zip(grads, mask.kept))
    assert zero == on_mask == mask.num_zeroed == math.floor(0.9 * mask.num_coordinates)


def test_rs_step_is_masked_sum_plus_masked_noise(model, batch, reference):
    """Same seed, with and without signal: the difference is exactly the clipped masked sum / B."""
    mask = draw_mask([p.shape for p in model.parameters()], rate=0.5, generator=torch.Generator().manual_seed(4))
    results = []
    for inputs in (batch, (batch[0][:0], batch[1][:0])):
        step = make_step(model, "rs", bound=0.2, seed=9)
        step.set_mask(mask)
        step(*inputs)
        results.append([p.grad.clone() for p in step.params])
        step.close()
    per_sample = [masked(g, mask) for g in reference]
    norms = torch.stack([norm_of(g) for g in per_sample])
    factors = flat_clip_factor(norms, max_grad_norm=0.2)
    expected = [
        sum(factors[i] * per_sample[i][k] for i in range(4)) / 4.0
        for k in range(len(per_sample[0]))
    ]
    difference = [a - b for a, b in zip(*results)]
    assert relative_error(difference, expected) < 1e-9


def test_consecutive_steps_agree_across_strategies(model, batch):
    """A second step must not see the first step's gradient (Opacus accumulates into p.grad)."""
    results = {}
    for strategy in STRATEGIES:
        step = make_step(model, "flat", bound=0.5, seed=4, strategy=strategy)
        step(*batch)
        step(*batch)
        results[strategy] = [p.grad.clone() for p in step.params]
        step.close()
    for strategy in ("loop", "opacus"):
        assert relative_error(results[strategy], results["ghost"]) < EXACT


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_batch_noise_std(strategy, model):
    # std of N(0, (sigma C / B)^2) estimated from d = 162,313 coordinates has relative
    # standard error 1/sqrt(2d) < 0.002; allow 0.02.
    sigma, bound, expected = 1.5, 0.4, 6.0
    step = make_step(model, "flat", sigma=sigma, bound=bound, expected=expected, strategy=strategy)
    images = torch.zeros(0, 1, 16, 16, dtype=torch.float64)
    stats = step(images, images)
    noise = torch.cat([p.grad.flatten() for p in step.params])
    step.close()
    assert stats.batch_size == 0
    assert float(noise.std()) == pytest.approx(sigma * bound / expected, rel=0.02)
    assert abs(float(noise.mean())) < 5 * sigma * bound / expected / math.sqrt(noise.numel())


def test_adaptive_noise_and_clip_update(model, batch, reference):
    sigma, count_noise = 1.0, 2.0
    z_grad = adaptive_noise_multiplier(sigma, count_noise=count_noise)
    assert z_grad == pytest.approx((1 - 1 / 16) ** -0.5)
    bound = AdaptiveClipBound(max_grad_norm=0.5, target_quantile=0.5, clip_lr=0.2, count_noise=count_noise)
    step = make_step(model, "adaptive", sigma=sigma, expected=6.0, adaptive=bound)
    images = torch.zeros(0, 1, 16, 16, dtype=torch.float64)
    step(images, images)
    noise = torch.cat([p.grad.flatten() for p in step.params])
    step.close()
    assert float(noise.std()) == pytest.approx(z_grad * 0.5 / 6.0, rel=0.02)


def test_adaptive_update_rule():
    bound = AdaptiveClipBound(max_grad_norm=2.0, target_quantile=0.5, clip_lr=0.2, count_noise=1.0)
    assert bound.update(0.75) == pytest.approx(2.0 * math.exp(-0.2 * 0.25))
    norms = torch.tensor([0.1, 0.2, 5.0, 6.0], dtype=torch.float64)
    source = NoiseSource(seed=0)
    # With expected batch size 4, b_hat = (2 - 2 + noise) / 4 + 0.5: mean 0.5, std 1/4.
    fractions = torch.tensor([
        bound.unclipped_fraction(norms, expected_batch_size=4.0, source=source) for _ in range(4000)
    ])
    assert float(fractions.mean()) == pytest.approx(0.5, abs=0.02)
    assert float(fractions.std()) == pytest.approx(0.25, rel=0.05)


def test_adaptive_needs_sigma_below_twice_count_noise():
    with pytest.raises(ValueError, match="noise_multiplier < 2 \\* adaptive-count-noise.*got noise_multiplier 3"):
        adaptive_noise_multiplier(3.0, count_noise=1.5)


def test_rs_step_requires_mask(model, batch):
    step = make_step(model, "rs")
    with pytest.raises(RuntimeError, match="needs set_mask"):
        step(*batch)
    step.close()


def test_secure_source_statistics():
    source = NoiseSource(secure=True)
    sample = source.normal((200_000,), std=3.0, dtype=torch.float64)
    assert float(sample.std()) == pytest.approx(3.0, rel=0.02)
    assert abs(float(sample.mean())) < 5 * 3.0 / math.sqrt(200_000)
    uniform = source.uniform(100_000)
    assert float(uniform.min()) >= 0
    assert float(uniform.max()) < 1
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.01)


def test_seeded_source_is_reproducible():
    first = NoiseSource(seed=7).normal((10,), std=1.0)
    assert torch.equal(first, NoiseSource(seed=7).normal((10,), std=1.0))
    assert not torch.equal(first, NoiseSource(seed=8).normal((10,), std=1.0))


def test_parallel_noise_streams():
    """Large fills draw from several streams: same seed, same noise, whatever the threads."""
    n = 1 << 21
    draws = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            tensors = [torch.empty(n - 5), torch.empty(5)]
            NoiseSource(seed=11).fill_normal_(tensors, std=2.0)
        finally:
            torch.set_num_threads(previous)
        draws.append(torch.cat(tensors))
    assert torch.equal(draws[0], draws[1])
    added = [torch.zeros(n - 5), torch.zeros(5)]
    NoiseSource(seed=11).add_normal_(added, std=2.0)
    assert torch.equal(torch.cat(added), draws[0])
    noise = draws[0].double()
    # Relative standard error of the std over 2M samples is 1/sqrt(4M) = 0.0005.
    assert float(noise.std()) == pytest.approx(2.0, rel=0.005)
    chunks = noise[: (n // 4) * 4].view(4, -1)
    correlation = torch.corrcoef(chunks)
    off_diagonal = correlation[~torch.eye(4, dtype=torch.bool)]
    assert float(off_diagonal.abs().max()) < 5 / math.sqrt(n // 4)


def test_rs_noise_only_on_kept_coordinates(model):
    """An empty RS step is pure noise: N(0, (sigma C / B)^2) on kept coordinates, 0 elsewhere."""
    sigma, bound, expected = 1.0, 0.5, 4.0
    mask = draw_mask([p.shape for p in model.parameters()], rate=0.6, generator=torch.Generator().manual_seed(5))
    step = make_step(model, "rs", sigma=sigma, bound=bound, expected=expected)
    step.set_mask(mask)
    images = torch.zeros(0, 1, 16, 16, dtype=torch.float64)
    step(images, images)
    kept = torch.cat([k.flatten() for k in mask.kept])
    noise = torch.cat([p.grad.flatten() for p in step.params])
    step.close()
    assert int((noise != 0).sum()) == mask.num_kept
    assert float(noise[~kept].abs().max()) == 0.0
    assert float(noise[kept].std()) == pytest.approx(sigma * bound / expected, rel=0.02)


def test_poisson_sample_size():
    # Size ~ Binomial(10000, 0.01) per draw: mean 100, std ~10; the mean of 200 draws
    # has std 0.7, allow 3.
    source = NoiseSource(seed=3)
    sizes = [len(poisson_sample(10_000, sample_rate=0.01, source=source)) for _ in range(200)]
    assert sum(sizes) / len(sizes) == pytest.approx(100, abs=3)
    assert len(poisson_sample(5, sample_rate=1.0, source=source)) == 5
    with pytest.raises(ValueError, match="sample_rate must lie in \\(0, 1\\], got 0"):
        poisson_sample(5, sample_rate=0, source=source)


def test_default_strategy_per_device():
    from common.privacy.per_sample import default_strategy

    assert default_strategy("cpu", sparsify=False) == "ghost"
    assert default_strategy("cpu", sparsify=True) == "ghost"
    assert default_strategy(torch.device("cuda"), sparsify=False) == "ghost"
    assert default_strategy("cuda", sparsify=True) == "opacus"


class _TwoBranchNet(torch.nn.Module):
    """Two layers read the input (two graph roots); one layer's output is cut off the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.left = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.right = torch.nn.Conv2d(1, 4, 5, padding=2, bias=False)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.cut = torch.nn.Conv2d(4, 4, 1)
        self.head = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.norm(self.left(x) + self.right(x)))
        return self.head(h + self.cut(h).detach())


def test_ghost_several_roots_and_cut_layer(batch):
    torch.manual_seed(0)
    net = _TwoBranchNet().double()
    images, targets = batch
    params = list(net.parameters())
    per_sample = []
    for i in range(len(images)):
        loss = dice_bce_loss(net(images[i : i + 1]), targets[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        per_sample.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])
    clip = lambda norms: flat_clip_factor(norms, max_grad_norm=0.05)  # noqa: E731
    factors = clip(torch.stack([norm_of(g) for g in per_sample]))
    expected = [sum(factors[i] * per_sample[i][k] for i in range(len(images))) for k in range(len(params))]
    out, _ = clipped_sum("ghost", net, batch, clip)
    def slot(param):
        return [id(p) for p in params].index(id(param))

    assert relative_error(out, expected) < EXACT
    assert float(out[slot(net.cut.weight)].abs().max()) == 0.0
    assert float(out[slot(net.right.weight)].abs().max()) > 0.0


def test_conv_kernel_choice_by_shape():
    """The ResNet34 U-Net's deep layers take ghost norms, the others the measured fastest kernel."""
    from common.privacy import conv_grads, layer_grads

    def conv_and_maps(channels, out_channels, side, stride=1):
        conv = torch.nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1)
        a = torch.empty(1, channels, side, side)
        b = torch.empty(1, out_channels, side // stride, side // stride)
        return conv, a, b

    assert conv_grads.ghost_is_cheaper(*conv_and_maps(512, 512, 4))  # layer4 at 128 px
    assert conv_grads.ghost_is_cheaper(*conv_and_maps(256, 256, 8))  # layer3 at 128 px
    assert not conv_grads.ghost_is_cheaper(*conv_and_maps(128, 128, 16))  # layer2 at 128 px
    assert not conv_grads.ghost_is_cheaper(*conv_and_maps(16, 16, 128))  # last decoder block
    conv, _, _ = conv_and_maps(256, 512, 8, stride=2)
    assert conv_grads.conv_method(conv, 16) == "unfold"
    conv, _, _ = conv_and_maps(128, 128, 16)
    assert conv_grads.conv_method(conv, 256) == "grouped"
    conv, _, _ = conv_and_maps(384, 128, 16)
    assert conv_grads.conv_method(conv, 256) == "loop"
    conv, _, _ = conv_and_maps(16, 16, 128)
    assert conv_grads.conv_method(conv, 128 * 128) == "loop"
