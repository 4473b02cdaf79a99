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
  layer-output gradients only, per-layer norms (ghost norms where cheaper, see
  :mod:`common.privacy.layer_grads`), then one batched weight-gradient pass with the
  output gradients reweighted by ``f_i``. Conv2d, GroupNorm and Linear layers only.

The per-example loss function must make example ``i``'s loss depend on example ``i``
alone, which holds for a model without BatchNorm (see :func:`common.model.check_private_safe`).
"""

from __future__ import annotations

import logging
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
        out: Sequence[Tensor],
    ) -> BatchStats:
        """Add ``sum_i f_i (m * g_i)`` to ``out`` (one tensor per trainable parameter).

        ``f = clip(norms)`` with ``norms_i = ||m * g_i||`` over all trainable parameters.
        Masked coordinates of ``out`` are left as they were. An empty batch adds nothing.
        """

    def close(self) -> None:
        """Remove hooks this strategy installed on the model."""


class LoopStrategy(PerSampleStrategy):
    """One forward and backward pass per example, accumulated into ``out`` as it goes."""

    name = "loop"

    def clipped_sum(self, images, targets, *, clip, mask, out):
        if images.shape[0] == 0:
            return BatchStats.empty()
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
        return BatchStats(norms=torch.cat(norms).cpu(), losses=torch.stack(losses).cpu())


class OpacusStrategy(PerSampleStrategy):
    """Opacus ``GradSampleModule`` hooks: all per-sample gradients at once, then clip and sum."""

    name = "opacus"

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        from opacus import GradSampleModule

        super().__init__(model, loss_fn)
        self.wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def clipped_sum(self, images, targets, *, clip, mask, out):
        if images.shape[0] == 0:
            return BatchStats.empty()
        for p in self.params:
            # backward() also accumulates the plain batch gradient into p.grad, which may
            # still point at the caller's output buffer from the previous step.
            p.grad = None
        losses = self.loss_fn(self.wrapped(images), targets)
        losses.sum().backward()
        try:
            with torch.no_grad():
                per_sample = [p.grad_sample for p in self.params]
                if mask is not None:
                    per_sample = [mask.apply_per_sample(k, g) for k, g in enumerate(per_sample)]
                norms = _total_norm(per_sample)
                factors = clip(norms)
                for accumulator, grads in zip(out, per_sample):
                    accumulator.add_(torch.einsum("i,i...->...", factors.to(grads.dtype), grads))
        finally:
            for p in self.params:
                p.grad_sample = None
                p.grad = None
        return BatchStats(norms=norms.cpu(), losses=losses.detach().cpu())

    def close(self) -> None:
        self.wrapped._close()


class GhostStrategy(PerSampleStrategy):
    """Book-keeping: per-layer norms from activations and output gradients, one reweighted pass."""

    name = "ghost"

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__(model, loss_fn)
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
        self._workspaces: dict[int, Tensor] = {}
        self._records: list[tuple[nn.Module, Tensor, Tensor]] = []
        self._recording = False
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if self._recording:
            self._records.append((module, inputs[0].detach(), output))

    def clipped_sum(self, images, targets, *, clip, mask, out):
        if images.shape[0] == 0:
            return BatchStats.empty()
        self._records = []
        self._recording = True
        try:
            losses = self.loss_fn(self.model(images), targets)
        finally:
            self._recording = False
        records, self._records = self._records, []
        self._check_records(records)
        outputs = [output for _, _, output in records]
        backprops = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        with torch.no_grad():
            norms, layers = self._layer_norms(records, backprops, mask)
            factors = clip(norms)
            for (module, a, _), b, grads in zip(records, backprops, layers):
                if b is None:
                    continue
                summed = layer_grads.weighted_sum(module, a, b, factors, grads)
                for k, grad in zip(self.param_slots[self._slot[id(module)]], summed):
                    if mask is not None and grads.per_sample is None:
                        grad.masked_fill_(mask.dropped[k], 0.0)
                    out[k].add_(grad)
        return BatchStats(norms=norms.cpu(), losses=losses.detach().cpu())

    def _layer_norms(self, records, backprops, mask):
        """Return per-sample norms over all layers and each layer's :class:`LayerGrads`.

        A convolution keeps its materialised per-sample gradients while their total size
        stays within the size of the output gradients already held. Memory for that part
        at most doubles, and the other materialised layers recompute their weighted sum.
        """
        batch = records[0][1].shape[0]
        budget = sum(b.numel() for b in backprops if b is not None)
        used = 0
        total = torch.zeros(batch, dtype=torch.float64, device=records[0][1].device)
        layers = []
        for (module, a, output), b in zip(records, backprops):
            b = torch.zeros_like(output) if b is None else b
            slots = self.param_slots[self._slot[id(module)]]
            dropped = [None if mask is None else mask.dropped[k] for k in slots]
            workspace = None
            if isinstance(module, nn.Conv2d) and layer_grads.materialises(module, b, masked=mask is not None):
                size = batch * module.weight.numel()
                if used + size <= budget:
                    workspace = self._workspace(module, batch)
                    used += size
            grads = layer_grads.layer_norms(module, a, b, dropped, workspace=workspace)
            total += grads.squared
            layers.append(grads)
        return total.sqrt(), layers

    def _workspace(self, module: nn.Module, batch: int) -> Tensor:
        """Return a reused ``(batch, *weight.shape)`` buffer for ``module``'s per-sample gradients."""
        buffer = self._workspaces.get(id(module))
        if buffer is None or buffer.shape[0] < batch:
            buffer = module.weight.new_empty((batch, *module.weight.shape))
            self._workspaces[id(module)] = buffer
        return buffer[:batch]

    def _check_records(self, records: list) -> None:
        calls: dict[int, int] = {}
        for module, _, _ in records:
            calls[id(module)] = calls.get(id(module), 0) + 1
        if any(count != 1 for count in calls.values()) or len(calls) != len(self.layers):
            raise ValueError(
                "per-sample strategy 'ghost' needs every layer with parameters to run exactly "
                "once per forward pass; this model reuses or skips layers; use strategy 'loop'"
            )

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


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
    """Return the per-sample strategy to use on ``device`` (for an RS method if ``sparsify``).

    CPU: ``ghost`` for dense methods and ``loop`` for RS. Measured with
    ``benchmarks/bench_dp_step.py`` (ResNet34 U-Net, batch 8, 128 px, 2 threads on a
    2-core AMD EPYC at load average 3.5; see BENCHMARKS.md), as wall time and extra memory
    relative to the non-private step: dense ghost 1.50x and 2.1x, dense loop 1.91x and
    1.1x; RS ghost 2.22x and 3.1x, RS loop 2.58x and 1.3x. Neither meets the time target,
    so RS takes the strategy that keeps its memory within the non-private step's.

    GPU: ``ghost`` for dense methods and ``opacus`` for RS, whose masked norms the other
    strategies compute one example at a time while Opacus uses batched kernels.
    NOTE: the GPU rule follows that reasoning; it has not been measured here.
    """
    on_gpu = torch.device(device).type == "cuda"
    if sparsify:
        return "opacus" if on_gpu else "loop"
    return "ghost"
