"""One site's work per server message: load its shard, train with DP-SGD, evaluate.

Plain functions over plain values (weights as ``{name: ndarray}``), so the federation
logic is tested without Flower; :mod:`client.app` only unpacks and packs messages.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from common import atomic
from common import federation as fed
from common.config import RunConfig
from common.model import build_unet, plain_state_dict
from common.privacy.ledger import PrivacyLedger, site_round_lock
from common.privacy.sparse_upload import (
    encode_update,
    mask_digest,
    round_mask,
    sparse_upload_applies,
    weight_shapes,
)
from common.results import STATUS_OK, STATUS_REFUSED
from client.evaluate import evaluate_model, pick_device
from client.train import train_site

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.json"
CLIP_BOUND_FILE = "adaptive_clip_bound.json"  # adaptive clipping's bound, carried across rounds


@dataclass(frozen=True)
class SiteSetup:
    """The folders of one site: its data, manifest, own records and cache."""

    site: int
    data_dir: Path
    manifest: Path | None
    site_dir: Path
    cache_dir: Path | None

    @property
    def ledger_path(self) -> Path:
        """The site's privacy ledger (on the site's own disk)."""
        return self.site_dir / LEDGER_FILE


@dataclass
class SiteData:
    """A site's train, validation and test datasets."""

    train: Any
    val: Any
    test: Any


@dataclass
class TrainReplyContent:
    """The three parts of a train reply: weights (None when refused), metrics, info."""

    weights: dict[str, np.ndarray] | None
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)


def site_id(node_config: Mapping[str, Any]) -> int:
    """Return this node's site id: node config ``site``, else Flower's ``partition-id``."""
    raw_site = node_config.get("site", node_config.get("partition-id"))
    if raw_site is None:
        raise ValueError(
            "the SuperNode has no 'site' or 'partition-id' in its node config; start it with "
            "--node-config \"site=0 data-dir='/path/to/data'\""
        )
    return int(raw_site)


def resolve_site(config: RunConfig, node_config: Mapping[str, Any]) -> SiteSetup:
    """Work out the site id and folders from the node config, falling back to the run config.

    In simulation Flower sets ``partition-id``; in deployment a SuperNode passes
    ``--node-config "site=0 data-dir='/data' site-dir='/var/dpfedseg'"`` (``partition-id``
    is accepted for ``site``). A site without a manifest uses its whole data folder.
    """
    site = site_id(node_config)
    data_dir = str(node_config.get("data-dir") or config.data_dir)
    if not data_dir:
        raise ValueError(
            f"site {site} has no data folder: set data-dir in the node config or the run config"
        )
    manifest = node_config.get("manifest", config.manifest if "data-dir" not in node_config else "")
    if node_config.get("site-dir"):
        site_dir = Path(str(node_config["site-dir"]))
    else:
        site_root = Path(config.site_dir) if config.site_dir else Path(config.output_dir) / "sites"
        site_dir = site_root / f"site-{site}"
    cache_dir = node_config.get("cache-dir") or config.cache_dir
    return SiteSetup(
        site=site,
        data_dir=Path(data_dir),
        manifest=Path(manifest) if manifest else None,
        site_dir=site_dir,
        cache_dir=Path(cache_dir) if cache_dir else None,
    )


def load_site_data(setup: SiteSetup, config: RunConfig) -> SiteData:
    """Return the site's datasets, read from the preprocessing cache."""
    from common.data import SegmentationDataset
    from common.sites import read_manifest, site_ids, site_style

    cache = _open_cache(str(setup.data_dir), config.image_size, str(setup.cache_dir or ""))
    if setup.manifest is not None:
        manifest = read_manifest(setup.manifest)
        site = setup.site
    else:
        manifest = _single_site_manifest(cache, config.seed)
        site = 0
    style = site_style(manifest, site)
    splits = {}
    for split in ("train", "val", "test"):
        ids = site_ids(manifest, site, split)
        splits[split] = SegmentationDataset(cache, ids, style=style, style_seed=config.seed * 7919 + setup.site)
    if len(splits["train"]) == 0:
        raise ValueError(
            f"site {setup.site} has no training images in {setup.manifest or setup.data_dir}; "
            "check the manifest's site ids against the partition ids"
        )
    return SiteData(**splits)


def train_round(
    config: RunConfig,
    node_config: Mapping[str, Any],
    weights: Mapping[str, np.ndarray],
    *,
    server_round: int,
) -> TrainReplyContent:
    """Train the global ``weights`` for one round at this site and build the reply."""
    setup = resolve_site(config, node_config)
    data = load_site_data(setup, config)
    device = pick_device()
    model = _model_with(config, weights)
    with site_round_lock(setup.site_dir) if config.private else nullcontext():
        # The ledger is read under the lock, so it contains every round recorded before this one.
        ledger = (
            PrivacyLedger(
                setup.ledger_path, delta=config.delta, target_epsilon=config.target_epsilon,
                accountant=config.accountant,
            )
            if config.private
            else None
        )
        result = train_site(
            model,
            data.train,
            config,
            ledger=ledger,
            server_round=server_round,
            site=setup.site,
            device=device,
            generator_seed=_simulation_seed(config, node_config, setup.site, server_round, ledger),
            max_grad_norm=_read_clip_bound(setup) if config.method == "adaptive" else None,
        )
        if config.method == "adaptive" and not result.refused:
            atomic.write_json(setup.site_dir / CLIP_BOUND_FILE, {"max_grad_norm": result.max_grad_norm})
    entries = list(ledger.entries) if ledger is not None else []
    metrics: dict[str, Any] = {
        fed.SITE: setup.site,
        fed.NUM_EXAMPLES: int(result.num_examples),
        "epsilon": float(result.epsilon),
        "delta": float(config.delta),
        "noise_multiplier": float(result.noise_multiplier),
        "sample_rate": float(result.sample_rate),
        **fed.pack_ledger(entries),
    }
    info = {fed.INFO_ACCOUNTANT: result.accountant, fed.INFO_METHOD: config.method}
    if result.refused:
        log.warning("site %d rejected round %d: %s", setup.site, server_round, result.refused)
        info.update({fed.INFO_STATUS: STATUS_REFUSED, fed.INFO_REASON: result.refused})
        metrics.update({"round_entries": 0, "steps": 0})
        return TrainReplyContent(weights=None, metrics=metrics, info=info)
    new_weights = {k: v.detach().cpu().numpy() for k, v in plain_state_dict(model).items()}
    upload, upload_kind = _upload(config, weights, new_weights, server_round, setup.site)
    info.update({fed.INFO_STATUS: STATUS_OK, fed.INFO_REASON: "", fed.INFO_UPLOAD: upload_kind})
    metrics.update(
        {
            "steps": int(result.steps),
            "train_seconds": float(result.seconds),
            "upload_bytes": int(sum(np.asarray(v).nbytes for v in upload.values())),
            "round_entries": len(result.entries),
        }
    )
    # A private site does not send its loss, because it comes from the training images
    # without noise. Its epoch log lines show it locally.
    if not config.private:
        metrics["train_loss"] = float(result.train_loss)
    return TrainReplyContent(weights=upload, metrics=metrics, info=info)


def _upload(
    config: RunConfig,
    old: Mapping[str, np.ndarray],
    new: dict[str, np.ndarray],
    server_round: int,
    site: int,
) -> tuple[dict[str, np.ndarray], str]:
    """Return the arrays to send: RS kept values when the update allows it, else weights."""
    if sparse_upload_applies(config):
        mask = round_mask(config, weight_shapes(old), server_round=server_round, site=site)
        values = encode_update(old, new, mask)
        if values is not None:
            return {fed.SPARSE_VALUES: values, fed.SPARSE_MASK_DIGEST: mask_digest(mask)}, fed.UPLOAD_SPARSE
        log.warning(
            "site %d: the update is not zero off the RS mask, so it is sent dense", site
        )
    return new, fed.UPLOAD_DENSE


def evaluate_global(
    config: RunConfig, node_config: Mapping[str, Any], weights: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Score the global ``weights`` on the site's validation and test splits."""
    setup = resolve_site(config, node_config)
    data = load_site_data(setup, config)
    model = _model_with(config, weights)
    device = pick_device()
    metrics: dict[str, float] = {fed.SITE: setup.site, fed.NUM_EXAMPLES: len(data.val)}
    for split, dataset in (("val", data.val), ("test", data.test)):
        if len(dataset) == 0:
            continue
        scores = evaluate_model(model, dataset, device=device)
        for key in ("dice", "dice_positive", "iou", "fpr"):
            value = scores.get(key)
            if value is not None and np.isfinite(value):
                metrics[f"{split}_{key}"] = float(value)
    return metrics


def _simulation_seed(
    config: RunConfig,
    node_config: Mapping[str, Any],
    site: int,
    server_round: int,
    ledger: PrivacyLedger | None,
) -> int | None:
    """Return a reproducible sampling/noise seed in simulation, None (OS entropy) otherwise.

    Anyone with the seed can regenerate the noise, so only a simulation (where Flower
    sets ``partition-id``) without ``secure-rng`` gets a seed derived from the run seed.
    The seed also depends on what the site's ledger already contains. The ledger
    composes a rerun on the same site folder with the earlier runs as independent
    mechanisms. Drawing the same noise again would break that, because two releases at
    different noise multipliers with the same noise reveal the clipped gradient sum.
    Every trained round adds an entry, so no two rounds of one site folder share a seed,
    and a fresh folder reproduces the same run.
    """
    if config.secure_rng or "partition-id" not in node_config:
        return None
    entries = ledger.entries if ledger is not None else []
    key = (config.seed, site, server_round, len(entries), sum(entry.steps for entry in entries))
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63: any torch or numpy seed


def _read_clip_bound(setup: SiteSetup) -> float | None:
    file = setup.site_dir / CLIP_BOUND_FILE
    if not file.exists():
        return None
    return float(json.loads(file.read_text())["max_grad_norm"])


def _model_with(config: RunConfig, weights: Mapping[str, np.ndarray]) -> torch.nn.Module:
    model = copy.deepcopy(_unet_template(config.encoder, config.group_norm_groups))
    state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
    model.load_state_dict(state)
    return model


@functools.lru_cache(maxsize=2)
def _unet_template(encoder: str, group_norm_groups: int) -> torch.nn.Module:
    # Building and checking a ResNet34 U-Net takes about 0.4 s after the first. Each
    # message copies this checked one and loads the server's weights into the copy.
    return build_unet(encoder=encoder, group_norm_groups=group_norm_groups)


@functools.lru_cache(maxsize=4)
def _open_cache(data_dir: str, image_size: int, cache_dir: str):
    from common.data import open_cache

    return open_cache(data_dir, image_size, cache_dir=cache_dir or None)


def _single_site_manifest(cache: Any, seed: int):
    from common.sites import partition

    return partition(cache.frame, setup="iid", num_sites=1, seed=seed, min_site_size=1).manifest
