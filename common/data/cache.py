"""The preprocessing cache: every image decoded and resized once per (dataset, size).

One cache entry is a folder under the cache directory:

    <name>-<root hash>-<size>px-<key>/
        images.bin   [N, S, S] uint8 (8-bit sources) or uint16, grey level * (2^bits - 1)
        masks.bin    [N, S, S] uint8 0/1
        frame.json   the records frame in cache order
        meta.json    format version, key, dtype, shape, build report summary

The key hashes the cache format version, the decoder versions, the image size, the
dataset root, every image and mask file's name, size and modification time, and the
content of the label, class and metadata CSVs. Any change gives a new key, so a stale
entry is never read. After a successful build, entries of the same root and size with
an older key are deleted. An entry is built in a temporary folder and renamed into place,
under a file lock, so concurrent clients build it once and never see half of it. The
dataset root is only read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import PIL
import pydicom
from tqdm import tqdm

from common import atomic
from common.data import folder, rsna
from common.data.dicom import ImageReadError
from common.data.images import read_image, read_mask
from common.data.load import detect_layout, load_dataset
from common.data.masks import box_mask, resample_mask, resize_image
from common.data.records import LoadedDataset, Record, coerce_frame_dtypes, records_frame
from common.data.report import LoadReport, check_failure_fraction, validate_failure_fraction
from common.runtime import state_dir
from common.text import counted

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
"""Bump when decoding, resizing or the stored layout changes, so old entries rebuild."""

CACHE_ENV = "DPFEDSEG_CACHE"
PROGRESS_MIN_IMAGES = 50
"""Builds of more images than this show a tqdm progress bar."""

PARALLEL_MIN_PIXELS = 256 * 1024 * 1024
"""Source pixels (summed over images) below which a build decodes in-process: starting
spawned worker processes took 2 to 6 s on the development machine, about the time one
core needs to decode 256 RSNA images of 1024 x 1024 (an estimate, not tuned)."""

MAX_WORKERS = 8


@dataclass(frozen=True)
class _Decoded:
    index: int
    image: np.ndarray | None
    mask: np.ndarray | None
    error: tuple[str, str, str] | None  # (kind, path, reason)


class ImageCache:
    """Memory-mapped images and masks of one dataset at one size, with the records frame.

    Attributes:
        path: the cache entry folder.
        image_size: side S of every stored image, in pixels.
        ids: patient ids in storage order.
        images: read-only memmap [N, S, S] of uint8 or uint16 grey levels.
        masks: read-only memmap [N, S, S] uint8 0/1.
        frame: the records frame (see ``LoadedDataset.frame``) in storage order.
        meta: the entry's ``meta.json`` (key, dtype, build counts).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text("utf-8"))
        count, size = int(self.meta["count"]), int(self.meta["image_size"])
        shape = (count, size, size)
        dtype = np.dtype(self.meta["dtype"])
        self.image_size = size
        self.images = np.memmap(self.path / "images.bin", dtype=dtype, mode="r", shape=shape)
        self.masks = np.memmap(self.path / "masks.bin", dtype=np.uint8, mode="r", shape=shape)
        rows = json.loads((self.path / "frame.json").read_text("utf-8"))
        self.frame = coerce_frame_dtypes(pd.DataFrame(rows))
        self.ids: list[str] = list(self.frame["patient_id"])
        self._positions = {patient_id: index for index, patient_id in enumerate(self.ids)}
        self._scale = float(2 ** (8 * dtype.itemsize) - 1)

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, patient_id: str) -> int:
        """Return the storage index of ``patient_id``; ``KeyError`` naming the cache if absent."""
        try:
            return self._positions[patient_id]
        except KeyError:
            raise KeyError(
                f"patient {patient_id!r} is not in the cache {self.path} ({len(self.ids)} images); "
                "it may have failed to decode or belong to another dataset"
            ) from None

    def image(self, index: int) -> np.ndarray:
        """Return image ``index`` as float32 [S, S] in [0, 1]."""
        return np.asarray(self.images[index], dtype=np.float32) / self._scale

    def mask(self, index: int) -> np.ndarray:
        """Return mask ``index`` as uint8 [S, S] of 0/1."""
        return np.asarray(self.masks[index])


def default_cache_dir() -> Path:
    """Return ``$DPFEDSEG_CACHE`` if set, else ``<state dir>/cache``."""
    override = os.environ.get(CACHE_ENV)
    return Path(override) if override else state_dir() / "cache"


def open_cache(
    root: Path | str,
    image_size: int,
    *,
    cache_dir: Path | str | None = None,
    max_failure_fraction: float = 0.1,
    workers: int | None = None,
) -> ImageCache:
    """Return the cache of ``root`` at ``image_size`` pixels, building it if missing or stale.

    Building loads the dataset (:func:`common.data.load_dataset`), decodes and resizes every
    image and builds its mask (see :mod:`common.data.masks` for the pixel convention). An
    image that fails to decode is left out and reported; past ``max_failure_fraction``
    failed images the build raises ``ValueError``. ``workers`` decoding processes are used
    for builds of at least :data:`PARALLEL_MIN_PIXELS` source pixels (default: CPU count,
    at most :data:`MAX_WORKERS`).
    """
    validate_failure_fraction(max_failure_fraction)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int of pixels; got {image_size!r}")
    root = Path(root).resolve()
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    prefix = _entry_prefix(root, image_size)
    key = cache_key(root, image_size)
    entry = base / f"{prefix}-{key[:16]}"
    if (entry / "meta.json").is_file():
        return _reuse(entry, max_failure_fraction)
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f".{prefix}.lock"):
        if (entry / "meta.json").is_file():
            return _reuse(entry, max_failure_fraction)
        _build(root, image_size, entry, key, max_failure_fraction, workers)
        _remove_older_entries(base, prefix, keep=entry)
    return ImageCache(entry)


def cache_key(root: Path | str, image_size: int) -> str:
    """Return the hex SHA-256 key of ``root``'s files and settings at ``image_size`` pixels."""
    root = Path(root).resolve()
    layout = detect_layout(root)
    digest = hashlib.sha256()
    settings = {
        "format": CACHE_FORMAT_VERSION,
        "image_size": image_size,
        "root": str(root),
        "layout": layout,
        "pydicom": pydicom.__version__,
        "pillow": PIL.__version__,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    if layout == "rsna":
        files = [root / rsna.LABELS_FILE, root / rsna.CLASS_FILE]
        files += [root / name for name in rsna.HEADER_TABLE_FILES]
        folders = [root / rsna.IMAGES_DIR]
    else:
        files = [root / folder.METADATA_FILE]
        folders = [root / folder.IMAGES_DIR, root / folder.MASKS_DIR]
    for path in files:
        digest.update(f"\n{path.name}:".encode())
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    for directory in folders:
        digest.update(f"\n{directory.name}/".encode())
        for name, size, mtime in _listing(directory):
            digest.update(f"{name}\t{size}\t{mtime}\n".encode())
    return digest.hexdigest()


def _build(
    root: Path,
    image_size: int,
    entry: Path,
    key: str,
    max_failure_fraction: float,
    workers: int | None,
) -> None:
    loaded = load_dataset(root, max_failure_fraction=max_failure_fraction, check_images=True)
    records = loaded.records
    bits = max((r.metadata.bits_stored or 8) for r in records)
    dtype = np.dtype(np.uint8 if bits <= 8 else np.uint16)
    log.info(
        "building the %d px cache of %s from %s in %s", image_size, counted(len(records), "image"), root, entry
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        kept = _decode_all(loaded, image_size, dtype, tmp, workers)
        report = loaded.report
        report.check_failure_fraction(
            kept_images=len(kept), max_failure_fraction=max_failure_fraction, source=str(root)
        )
        if not kept:
            raise ValueError(f"{root}: no image could be decoded; see the warnings above")
        frame = records_frame([records[i] for i in kept])
        atomic.write_text(tmp / "frame.json", frame.to_json(orient="records"))
        atomic.write_json(tmp / "meta.json", _meta(root, image_size, key, dtype, kept, report))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; other users of the machine may read it
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _decode_all(
    loaded: LoadedDataset, image_size: int, dtype: np.dtype, tmp: Path, workers: int | None
) -> list[int]:
    """Decode every record into ``tmp``'s arrays; return the indices of the kept records."""
    records = loaded.records
    count = len(records)
    shape = (count, image_size, image_size)
    images = np.memmap(tmp / "images.bin", dtype=dtype, mode="w+", shape=shape)
    masks = np.memmap(tmp / "masks.bin", dtype=np.uint8, mode="w+", shape=shape)
    kept: list[int] = []

    progress = tqdm(
        total=count, desc=f"cache {image_size}px", unit="img", disable=count <= PROGRESS_MIN_IMAGES
    )
    with progress:
        for item in _decoded_items(records, image_size, dtype, workers):
            progress.update(1)
            if item.error is not None:
                loaded.report.add(*item.error)
                continue
            slot = len(kept)
            images[slot] = item.image
            masks[slot] = item.mask
            kept.append(item.index)

    images.flush()
    masks.flush()
    del images, masks
    frame_bytes = image_size * image_size
    for name, itemsize in (("images.bin", dtype.itemsize), ("masks.bin", 1)):
        # Failed images leave the tail unused; cut it so the files hold exactly len(kept).
        os.truncate(tmp / name, len(kept) * frame_bytes * itemsize)
    loaded.report.decoded = True
    loaded.report.log_suppressed()
    return kept


def _decoded_items(
    records: list[Record], image_size: int, dtype: np.dtype, workers: int | None
) -> Iterator[_Decoded]:
    jobs = [(index, record, image_size, dtype.str) for index, record in enumerate(records)]
    workers = workers if workers is not None else min(os.cpu_count() or 1, MAX_WORKERS)
    pixels = sum((r.metadata.rows or 0) * (r.metadata.columns or 0) for r in records)
    if workers <= 1 or pixels < PARALLEL_MIN_PIXELS:
        yield from map(_decode_job, jobs)
        return
    # Spawned workers: forking a process that runs torch or Ray threads can deadlock.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_decode_job, jobs, chunksize=16)


def _decode_job(job: tuple[int, Record, int, str]) -> _Decoded:
    index, record, size, dtype_str = job
    try:
        image, mask = decode_record(record, size)
    except ImageReadError as error:
        return _Decoded(index, None, None, (error.kind, str(error.path), error.reason))
    scale = float(2 ** (8 * np.dtype(dtype_str).itemsize) - 1)
    stored = np.rint(image * scale).astype(dtype_str)
    return _Decoded(index, stored, mask, None)


def decode_record(record: Record, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``record``'s image (float32 [S, S] in [0, 1]) and mask (uint8 0/1) at ``size``.

    Raises :class:`ImageReadError` when the image cannot be decoded or its mask does not
    match it.
    """
    pixels = read_image(record.image_path)
    rows, columns = pixels.shape
    if record.mask_path is not None:
        mask = read_mask(record.mask_path).mask
        if mask.shape != pixels.shape:
            raise ImageReadError(
                "bad_mask",
                record.mask_path,
                f"mask is {mask.shape[1]} x {mask.shape[0]} but its image is "
                f"{columns} x {rows} (width x height)",
            )
        resized_mask = resample_mask(mask, size)
    else:
        boxes = [b for b in (box.clipped(rows=rows, columns=columns) for box in record.boxes) if b]
        resized_mask = box_mask(boxes, rows=rows, columns=columns, size=size)
    return resize_image(pixels, size), resized_mask


def _meta(
    root: Path, image_size: int, key: str, dtype: np.dtype, kept: list[int], report: LoadReport
) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT_VERSION,
        "key": key,
        "root": str(root),
        "image_size": image_size,
        "dtype": dtype.str,
        "count": len(kept),
        "failed_images": report.failed_images,
        "rejected_rows": report.rejected_rows,
        "label_rows": report.label_rows,
        "issue_counts": {k: v for k, v in report.counts().items() if v},
    }


def _reuse(entry: Path, max_failure_fraction: float) -> ImageCache:
    cache = ImageCache(entry)
    meta = cache.meta
    # The build's counts are checked again so that a stricter threshold than the build's applies.
    check_failure_fraction(
        failed_images=int(meta["failed_images"]),
        kept_images=len(cache),
        rejected_rows=int(meta["rejected_rows"]),
        label_rows=int(meta["label_rows"]),
        max_failure_fraction=max_failure_fraction,
        source=f"{meta['root']} (cache {entry})",
    )
    log.info("reusing the %d px cache of %s in %s", cache.image_size, counted(len(cache), "image"), entry)
    return cache


def _entry_prefix(root: Path, image_size: int) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name)[:40] or "dataset"
    root_hash = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return f"{name}-{root_hash}-{image_size}px"


def _remove_older_entries(base: Path, prefix: str, *, keep: Path) -> None:
    for path in base.glob(f"{prefix}-*"):
        if path.is_dir() and path != keep:
            log.info("removing the stale cache %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _listing(directory: Path) -> list[tuple[str, int, int]]:
    if not directory.is_dir():
        return []
    entries = []
    with os.scandir(directory) as scan:
        for item in scan:
            if item.is_file():
                stat = item.stat()
                entries.append((item.name, stat.st_size, stat.st_mtime_ns))
    return sorted(entries)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
