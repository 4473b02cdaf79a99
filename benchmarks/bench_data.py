"""Data benchmarks: DICOM decoding, cache build and reads, synthetic generation, learnability.

Prints one table per part; the results go to the "Data" section of BENCHMARKS.md.

    python benchmarks/bench_data.py [--sample DIR] [--learn]

- decode: ``decode_dicom`` of every RSNA sample file (1024 x 1024 JPEG Baseline).
- cache build: a cold ``open_cache`` (empty cache folder) of the sample per image size.
- cached reads: ``SegmentationDataset`` items in random order, plain and with a style.
- synth: ``synthesize`` seconds per image per size.
- learn (optional, minutes on 2 cores): a small non-private U-Net is trained on synthetic
  images. Its validation Dice on positive images shows whether the opacities are learnable.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from common.data import SegmentationDataset, open_cache, synthesize
from common.data.dicom import decode_dicom
from common.data.rsna import IMAGES_DIR
from common.runtime import project_root
from common.style import AcquisitionStyle

DEFAULT_SAMPLE = project_root().parent / "shared" / "data" / "rsna-sample"
CACHE_SIZES = (64, 128, 256)
READ_SIZE = 256
READS = 4000
SYNTH_RUNS = ((64, 100), (256, 50), (1024, 10))  # (image size, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="RSNA-layout folder")
    parser.add_argument("--learn", action="store_true", help="also run the learnability check")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(_machine())
    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(scratch)
        _table("decode", ["images", "wall s", "images/s", "CPU images/s"],
               [_bench_decode(args.sample)])
        _table("cold cache build (1 worker)",
               ["size px", "images", "wall s", "images/s", "CPU images/s"],
               [_bench_build(args.sample, size, scratch_dir) for size in CACHE_SIZES])
        _table("cached reads", ["size px", "style", "reads", "wall s", "samples/s", "CPU samples/s"],
               _bench_reads(args.sample, scratch_dir))
        _table("synthetic generation", ["size px", "images", "wall s", "ms/image", "CPU ms/image"],
               [_bench_synth(size, count, scratch_dir) for size, count in SYNTH_RUNS])
        if args.learn:
            _table("learnability (non-private U-Net, synthetic 64 px)",
                   ["train", "val", "steps", "seconds", "val dice_positive", "val fpr"],
                   [_bench_learn(scratch_dir)])


def _bench_decode(sample: Path) -> list:
    files = sorted((sample / IMAGES_DIR).glob("*.dcm"))
    with _Timer() as timer:
        for path in files:
            decode_dicom(path)
    return [len(files), f"{timer.wall:.2f}", *timer.rates(len(files))]


def _bench_build(sample: Path, size: int, scratch: Path) -> list:
    with _Timer() as timer:
        cache = open_cache(sample, size, cache_dir=scratch / f"build-{size}", workers=1)
    return [size, len(cache), f"{timer.wall:.2f}", *timer.rates(len(cache))]


def _bench_reads(sample: Path, scratch: Path) -> list[list]:
    cache = open_cache(sample, READ_SIZE, cache_dir=scratch / "reads", workers=1)
    rows = []
    for name, style in (("none", None), ("noise+gamma", AcquisitionStyle(gamma=1.2, noise_std=0.02))):
        dataset = SegmentationDataset(cache, cache.ids, style=style, style_seed=1)
        order = np.random.default_rng(0).integers(len(dataset), size=READS)
        with _Timer() as timer:
            for index in order:
                dataset[int(index)]
        rows.append([READ_SIZE, name, READS, f"{timer.wall:.2f}", *timer.rates(READS)])
    return rows


def _bench_synth(size: int, count: int, scratch: Path) -> list:
    with _Timer() as timer:
        synthesize(scratch / f"synth-{size}", images=count, seed=0, image_size=size)
    return [size, count, f"{timer.wall:.2f}", f"{timer.wall / count * 1000:.0f}",
            f"{timer.cpu / count * 1000:.0f}"]


def _bench_learn(scratch: Path, *, images: int = 320, size: int = 64, epochs: int = 10) -> list:
    import torch
    from torch.utils.data import DataLoader

    from common.metrics import SegmentationScores, dice_bce_loss
    from common.model import build_unet

    torch.manual_seed(0)
    root = scratch / "learn"
    synthesize(root, images=images, seed=7, image_size=size, positive_rate=0.5)
    cache = open_cache(root, size, cache_dir=scratch / "learn-cache", workers=1)
    split = int(0.8 * len(cache))
    train = SegmentationDataset(cache, cache.ids[:split])
    val = SegmentationDataset(cache, cache.ids[split:])
    model = build_unet(encoder="resnet18", encoder_depth=4, decoder_channels=(128, 64, 32, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(train, batch_size=16, shuffle=True)
    steps = 0
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for images_batch, masks in loader:
            optimizer.zero_grad()
            loss = dice_bce_loss(model(images_batch), masks).mean()
            loss.backward()
            optimizer.step()
            steps += 1
        logging.getLogger(__name__).warning("learn: epoch %d, last batch loss %.3f", epoch, loss.item())
    seconds = time.perf_counter() - started
    model.eval()
    scores = SegmentationScores()
    with torch.no_grad():
        for images_batch, masks in DataLoader(val, batch_size=32):
            scores.add(model(images_batch), masks)
    summary = scores.summary()
    return [len(train), len(val), steps, f"{seconds:.0f}", f"{summary['dice_positive']:.3f}",
            f"{summary['fpr']:.3f}"]


class _Timer:
    """Wall-clock and process CPU time of a block (CPU time is robust to a loaded machine)."""

    def __enter__(self) -> "_Timer":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu

    def rates(self, count: int) -> list[str]:
        """Return ``[count per wall second, count per CPU second]`` formatted."""
        return [f"{count / self.wall:.1f}", f"{count / self.cpu:.1f}"]


def _machine() -> str:
    import PIL
    import pydicom
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"machine: {cpu}, {os.cpu_count()} CPUs visible; Python {platform.python_version()}, "
        f"numpy {np.__version__}, pydicom {pydicom.__version__}, Pillow {PIL.__version__}, "
        f"torch {torch.__version__}"
    )


def _table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(value) for value in row) + " |")


if __name__ == "__main__":
    main()
