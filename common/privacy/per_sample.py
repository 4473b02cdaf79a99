"""Per-sample gradient strategies: each returns ``sum_i f_i (m * g_i)`` for clip factors ``f``.

All strategies compute the same quantity, exactly up to floating-point rounding. They
take the per-sample gradients ``g_i`` of the per-example losses, mask them with the RS
mask ``m`` when there is one, and compute the norms ``||m * g_i||``, the clip factors
``f_i = clip(norms)_i`` and the sum of the clipped contributions. They differ in cost:

- ``opacus``: Opacus ``GradSampleModule`` hooks materialise every per-sample gradient
  (``B x d`` floats) in one batched backward pass.
- ``loop``: one forward and backward pass per example, accumulated as it streams; the
  least memory, any model.
- ``ghost``: book-keeping. One batched forward pass and one backward pass for the
  layer-output gradients only; each layer's per-sample norms are taken as its output
  gradient arrives (ghost norms or per-sample gradients, see
  :mod:`common.privacy.layer_grads`), and its clipped sum comes from kept per-sample
  gradients or one weight-gradient pass of the output gradients reweighted by ``f_i``.
  Conv2d, GroupNorm and Linear layers only; the fastest on the CPU, at about the
  non-private step's memory.

The per-example loss function must make example ``i``'s loss depend on example ``i``
alone, which holds for a model without BatchNorm (see :func:`common.model.check_private_safe`).
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from common.privacy import layer_grads
from common.privacy.sparsify import SparsityMask

logger = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(logits, targets) -> per-example losses`` of shape ``(B,)``."""
ClipFn = Callable[[Tensor], Tensor]
"""Per-sample norms (float64, ``(B,)``) to clip factors of the same shape."""

STRATEGIES = ("ghost", "loop", "opacus")


@dataclass(frozen=True)
class BatchStats:
    """Per-sample norms (after masking) and per-example losses of one clipped sum."""

    norms: Tensor
    losses: Tensor

    @classmethod
    def empty(cls) -> "BatchStats":
        """Stats of an empty batch."""
        return cls(norms=torch.zeros(0, dtype=torch.float64), losses=torch.zeros(0))


class PerSampleStrategy(ABC):
    """Computes clipped sums of per-sample gradients of one model's trainable parameters."""

    name: str = ""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")

    @abstractmethod
    def clipped_sum(
        self,
        images: Tensor,
        targets: Tensor,
        *,
        clip: ClipFn,
        mask: SparsityMask | None,
    ) -> tuple[list[Tensor], BatchStats]:
        """Return ``sum_i f_i (m * g_i)`` (one new tensor per trainable parameter) and stats.

        ``f = clip(norms)`` with ``norms_i = ||m * g_i||`` over all trainable parameters.
        Masked coordinates of the sums are 0; an empty batch gives zeros. The sums are
        allocated once the batch's activations are freed where the strategy allows, so
        that they do not add to the peak memory of the forward pass.
        """

    def zeros(self) -> list[Tensor]:
        """Return a zero tensor like each trainable parameter."""
        return [torch.zeros_like(p) for p in self.params]

    def prepare_mask(self, mask: SparsityMask | None) -> None:
        """Build what this strategy needs of ``mask`` once, before the steps that use it."""

    def close(self) -> None:
        """Remove hooks this strategy installed on the model."""


class LoopStrategy(PerSampleStrategy):
    """One forward and backward pass per example, accumulated into the sums as it goes."""

    name = "loop"

    def clipped_sum(self, images, targets, *, clip, mask):
        out = self.zeros()
        if images.shape[0] == 0:
            return out, BatchStats.empty()
        norms, losses = [], []
        for i in range(images.shape[0]):
            loss = self.loss_fn(self.model(images[i : i + 1]), targets[i : i + 1]).sum()
            grads = torch.autograd.grad(loss, self.params)
            with torch.no_grad():
                if mask is not None:
                    mask.apply_(grads)
                norm = _total_norm([g.unsqueeze(0) for g in grads])
                factor = clip(norm)
                for accumulator, grad in zip(out, grads):
                    accumulator.add_(grad, alpha=float(factor[0]))
            norms.append(norm)
            losses.append(loss.detach())
        return out, BatchStats(norms=torch.cat(norms).cpu(), losses=torch.stack(losses).cpu())


class OpacusStrategy(PerSampleStrategy):
    """Opacus ``GradSampleModule`` hooks: all per-sample gradients at once, then clip and sum."""

    name = "opacus"

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        from opacus import GradSampleModule

        super().__init__(model, loss_fn)
        self.wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def clipped_sum(self, images, targets, *, clip, mask):
        if images.shape[0] == 0:
            return self.zeros(), BatchStats.empty()
        for p in self.params:
            # backward() also accumulates the plain batch gradient into p.grad, which may
            # still hold the caller's gradient from the previous step.
            p.grad = None
        losses = self.loss_fn(self.wrapped(images), targets)
        with warnings.catch_warnings():
            # Opacus's hooks fire on the layer outputs; that the images need no gradient
            # changes nothing here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        try:
            with torch.no_grad():
                per_sample = [p.grad_sample for p in self.params]
                if mask is not None:
                    per_sample = [mask.apply_per_sample(k, g) for k, g in enumerate(per_sample)]
                norms = _total_norm(per_sample)
                factors = clip(norms)
                out = [torch.einsum("i,i...->...", factors.to(g.dtype), g) for g in per_sample]
        finally:
            for p in self.params:
                p.grad_sample = None
                p.grad = None
        return out, BatchStats(norms=norms.cpu(), losses=losses.detach().cpu())

    def close(self) -> None:
        self.wrapped._close()


class GhostStrategy(PerSampleStrategy):
    """Book-keeping: per-layer norms during one backward pass, then the clipped sum per layer.

    The backward pass computes only layer-output gradients (no weight gradients). A
    hook on each layer's output books the layer as soon as its output gradient exists
    (:func:`common.privacy.layer_grads.book_layer`): per-sample squared norms, and either
    the per-sample gradients at the mask's kept coordinates or the layer's input and
    output gradient. Per-sample gradients are kept while their total stays within
    ``memory_budget`` elements. The default budget is the number of elements of the
    batch's layer outputs, about what the forward pass stores for backward and frees
    during it. In the benchmark the peak of live tensor memory stayed at 0.96 times
    the non-private step's for every method.
    """

    name = "ghost"

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, memory_budget: int | None = None) -> None:
        super().__init__(model, loss_fn)
        self.memory_budget = memory_budget
        self.layers: list[nn.Module] = []
        self.param_slots: list[list[int]] = []
        index = {id(p): k for k, p in enumerate(self.params)}
        claimed: set[int] = set()
        for name, module in model.named_modules():
            own = list(module.parameters(recurse=False))
            trainable = [p for p in own if p.requires_grad]
            if not trainable:
                continue
            layer_grads.check_supported(name, module)
            if len(trainable) != len(own) or any(id(p) in claimed for p in own):
                raise ValueError(
                    f"per-sample strategy 'ghost' needs each layer's parameters all trainable "
                    f"and not shared; {name} breaks this; use strategy 'loop'"
                )
            claimed.update(id(p) for p in own)
            self.layers.append(module)
            self.param_slots.append([index[id(p)] for p in own])
        self._slot = {id(module): k for k, module in enumerate(self.layers)}
        self._recording = False
        self._pass: _BackwardBooks | None = None
        self._mask_parts: tuple[SparsityMask, list] | None = None
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if self._recording:
            self._pass.record(self._slot[id(module)], inputs[0], output)

    def clipped_sum(self, images, targets, *, clip, mask):
        if images.shape[0] == 0:
            return self.zeros(), BatchStats.empty()
        masks = self._masks(mask)
        self._pass = _BackwardBooks(self.layers, masks, self.memory_budget)
        self._recording = True
        try:
            losses = self.loss_fn(self.model(images), targets)
        finally:
            self._recording = False
        books, self._pass = self._pass, None
        books.check_calls()
        if books.roots:
            torch.autograd.grad(losses.sum(), books.roots, allow_unused=True)
        with torch.no_grad():
            norms = books.norms(images.shape[0], images.device)
            factors = clip(norms)
            out: list[Tensor | None] = [None] * len(self.params)
            for slot, book in enumerate(books.books):
                if book is None:
                    continue  # the layer's output does not reach the loss
                sums = layer_grads.weighted_sums(self.layers[slot], book, factors, masks[slot])
                for k, summed in zip(self.param_slots[slot], sums):
                    out[k] = summed
                books.books[slot] = None  # free its kept gradients as soon as summed
        out = [torch.zeros_like(p) if s is None else s for p, s in zip(self.params, out)]
        return out, BatchStats(norms=norms.cpu(), losses=losses.detach().cpu())

    def prepare_mask(self, mask: SparsityMask | None) -> None:
        self._mask_parts = None  # let the previous window's mask go
        self._masks(mask)

    def _masks(self, mask: SparsityMask | None) -> list[list[layer_grads.ParamMask | None]]:
        """Return the mask parts of every layer's parameters; None where nothing is dropped.

        The parts of the last mask are cached: a mask serves every step of its window.
        """
        if mask is None:
            return [[None] * len(slots) for slots in self.param_slots]
        if self._mask_parts is not None and self._mask_parts[0] is mask:
            return self._mask_parts[1]
        parts = []
        for layer, slots in zip(self.layers, self.param_slots):
            layer_parts = []
            for position, k in enumerate(slots):
                dropped, kept_index = mask.dropped[k], mask.kept_index[k]
                if kept_index.numel() == dropped.numel():
                    layer_parts.append(None)
                elif isinstance(layer, nn.Conv2d) and position == 0:
                    layer_parts.append(layer_grads.conv_mask(dropped, kept_index))
                else:
                    layer_parts.append(layer_grads.ParamMask(dropped=dropped, kept_index=kept_index))
            parts.append(layer_parts)
        self._mask_parts = (mask, parts)
        return parts

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _BackwardBooks:
    """One batch's layer books, filled by output-gradient hooks during the backward pass."""

    def __init__(self, layers: list[nn.Module], masks: list, memory_budget: int | None) -> None:
        self.layers = layers
        self.masks = masks
        self.memory_budget = memory_budget
        self.calls = [0] * len(layers)
        self.inputs: list[Tensor | None] = [None] * len(layers)
        self.stats: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)
        self.books: list[layer_grads.LayerBook | None] = [None] * len(layers)
        self.roots: list[Tensor] = []
        self.outputs_size = 0
        self.used = 0

    def record(self, slot: int, layer_input: Tensor, output: Tensor) -> None:
        """Note one forward call of layer ``slot`` and hook its output gradient."""
        self.calls[slot] += 1
        self.inputs[slot] = layer_input.detach()
        self.stats[slot] = layer_grads.group_norm_stats(output)
        self.outputs_size += output.numel()
        if not output.requires_grad:
            return
        # A layer whose input needs no gradient starts a path of the graph. Asking for the
        # gradients of these outputs reaches every layer without computing weight gradients.
        if not layer_input.requires_grad:
            self.roots.append(output)
        output.register_hook(lambda grad, slot=slot: self._book(slot, grad))

    def _book(self, slot: int, grad: Tensor) -> None:
        budget = self.outputs_size if self.memory_budget is None else self.memory_budget
        with torch.no_grad():
            book = layer_grads.book_layer(
                self.layers[slot], self.inputs[slot], grad, self.masks[slot],
                allowance=max(budget - self.used, 0), stats=self.stats[slot],
            )
        self.inputs[slot] = self.stats[slot] = None  # let the input go with the graph unless the book keeps it
        self.used += book.stored
        self.books[slot] = book

    def check_calls(self) -> None:
        """Raise unless every layer ran exactly once in the forward pass."""
        if any(count != 1 for count in self.calls):
            raise ValueError(
                "per-sample strategy 'ghost' needs every layer with parameters to run exactly "
                "once per forward pass; this model reuses or skips layers; use strategy 'loop'"
            )

    def norms(self, batch: int, device: torch.device) -> Tensor:
        """Return each example's gradient norm over all layers (float64), with the recomputed sums' rounding.

        The rounding bounds of the layers whose sums are recomputed add to the norm, so
        that the clipped contribution, as summed, stays within the clipping bound.
        """
        total = torch.zeros(batch, dtype=torch.float64, device=device)
        rounding = torch.zeros(batch, dtype=torch.float64, device=device)
        for book in self.books:
            if book is not None:
                total += book.squared
                if book.rounding is not None:
                    rounding += book.rounding.square()
        return total.sqrt() + rounding.sqrt()


def _total_norm(per_sample: Sequence[Tensor]) -> Tensor:
    """Return the L2 norm over all parameters of each example, in float64."""
    total = None
    for grads in per_sample:
        square = grads.reshape(grads.shape[0], -1).pow(2).sum(1, dtype=torch.float64)
        total = square if total is None else total + square
    return total.sqrt()


def make_strategy(name: str, model: nn.Module, loss_fn: LossFn) -> PerSampleStrategy:
    """Build the per-sample strategy ``name`` (one of :data:`STRATEGIES`) for ``model``."""
    classes = {"ghost": GhostStrategy, "loop": LoopStrategy, "opacus": OpacusStrategy}
    if name not in classes:
        raise ValueError(f"unknown per-sample strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return classes[name](model, loss_fn)


def default_strategy(device: torch.device | str, *, sparsify: bool) -> str:
    """Return the per-sample strategy to use on ``device`` without timing (RS method if ``sparsify``).

    CPU: ``ghost`` for every method. Measured with ``benchmarks/bench_dp_step.py``
    (ResNet34 U-Net, batch 8, 2 threads on a 2-core AMD EPYC; see BENCHMARKS.md), as
    median wall time relative to the non-private step: ghost 1.15x to 1.30x at 128 px
    and 1.03x to 1.16x at 256 px for every method, against 2.43x to 2.64x (128 px) and
    1.17x to 1.25x (256 px) for ``loop`` and more for ``opacus``. Ghost's peak of live
    tensor memory is 0.96x the non-private step's.

    GPU: :func:`common.privacy.choose.choose_strategy` times the candidates on the
    model instead. Without timing, ``ghost`` for dense methods and ``opacus`` for RS,
    whose batched kernels suit a GPU better than ghost's per-example and sparse kernels.
    """
    on_gpu = torch.device(device).type == "cuda"
    if sparsify and on_gpu:
        return "opacus"
    return "ghost"
