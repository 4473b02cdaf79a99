"""Sparse uploads for random sparsification: send only the kept coordinates.

With one RS mask for a whole federated round and plain SGD (no momentum, no weight
decay), every local step changes only the kept coordinates, so a site's model update is
zero on the ``floor(p * d)`` masked ones. The mask comes from a seed that the server can
derive too (run seed, round, site), so the site sends the kept values only and the
server rebuilds the full weights: ``(1 - p) * d`` floats instead of ``d``.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import torch

from common.config import RunConfig
from common.privacy.sparsify import (
    SparsityMask,
    mask_seed,
    rs_num_windows,
    rs_rate,
    rs_window,
    seeded_mask,
)

SPARSE_METHODS = ("rs", "rs-automatic")


def sparse_upload_applies(config: RunConfig) -> bool:
    """Return whether ``config``'s updates are zero off the round's mask (RS, per-round mask, SGD)."""
    return config.method in SPARSE_METHODS and config.rs_refresh == "round" and config.momentum == 0


def round_mask(
    config: RunConfig, shapes: list[torch.Size], *, server_round: int, site: int
) -> SparsityMask:
    """Return the RS mask a site uses for ``server_round`` when the mask is redrawn per round.

    Rounds past the planned schedule keep the final rate, as training does.
    """
    windows = rs_num_windows(
        num_server_rounds=config.num_server_rounds,
        local_epochs=config.local_epochs,
        refresh=config.rs_refresh,
    )
    window = rs_window(
        server_round=server_round,
        local_epoch=0,
        local_epochs=config.local_epochs,
        refresh=config.rs_refresh,
    )
    window = min(window, windows - 1)
    rate = rs_rate(window, num_windows=windows, final_rate=config.rs_final_rate)
    seed = mask_seed(seed=config.seed, server_round=server_round, site=site, window=window)
    return seeded_mask(shapes, rate=rate, seed=seed)


def weight_shapes(weights: Mapping[str, np.ndarray]) -> list[torch.Size]:
    """Return the shapes of ``weights`` in key order (the order masks are drawn in)."""
    return [torch.Size(np.shape(v)) for v in weights.values()]


def encode_update(
    old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray], mask: SparsityMask
) -> np.ndarray | None:
    """Return the kept coordinates of ``new - old`` as one float32 vector.

    Returns None when the update is not zero on every masked coordinate (for example a
    model with buffers, or an optimiser with momentum), so the caller sends dense weights.
    """
    values = []
    for (key, before), kept, index in zip(old.items(), mask.kept, mask.kept_index):
        delta = np.asarray(new[key], dtype=np.float32) - np.asarray(before, dtype=np.float32)
        if delta.shape != tuple(kept.shape):
            return None
        flat = delta.reshape(-1)
        kept_values = flat[index.cpu().numpy()]
        # A nonzero masked coordinate would add to the count of the whole update only.
        if np.count_nonzero(flat) != np.count_nonzero(kept_values):
            return None
        values.append(kept_values)
    return np.concatenate(values) if values else np.zeros(0, dtype=np.float32)


def mask_digest(mask: SparsityMask) -> np.ndarray:
    """Return a 16-byte BLAKE2b digest (uint8) of the mask's shapes and kept coordinates."""
    digest = hashlib.blake2b(digest_size=16)
    for kept in mask.kept:
        digest.update(repr(tuple(kept.shape)).encode())
        digest.update(np.packbits(kept.cpu().numpy().ravel()).tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint8).copy()


def decode_update(
    old: Mapping[str, np.ndarray],
    values: np.ndarray,
    mask: SparsityMask,
    *,
    digest: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Rebuild full weights from ``old`` and the kept-coordinate ``values`` of the update.

    With ``digest``, the site's :func:`mask_digest`, raise ValueError unless ``mask`` is
    the one the site used. A different mask with as many kept coordinates would put the
    values on the wrong coordinates without any other sign.
    """
    if digest is not None and not np.array_equal(np.asarray(digest, dtype=np.uint8), mask_digest(mask)):
        raise ValueError(
            "the site's RS mask differs from the one the server rebuilt for it; run the same "
            "dpfedseg version and RS settings at the server and every site"
        )
    if values.shape != (mask.num_kept,):
        raise ValueError(
            f"sparse update has {values.shape} values but the round's mask keeps "
            f"{mask.num_kept} coordinates; the site and server disagree on the RS schedule"
        )
    rebuilt: dict[str, np.ndarray] = {}
    offset = 0
    for (key, before), index in zip(old.items(), mask.kept_index):
        positions = index.cpu().numpy()
        weights = np.array(before, dtype=np.float32, copy=True)
        weights.reshape(-1)[positions] += values[offset : offset + positions.size]
        rebuilt[key] = weights.astype(np.asarray(before).dtype, copy=False)
        offset += positions.size
    return rebuilt
