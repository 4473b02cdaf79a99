"""The preprocessing cache and the torch dataset that reads it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data import SegmentationDataset, load_dataset, open_cache
from common.data.cache import CACHE_ENV, cache_key, decode_record, default_cache_dir
from common.data.dataset import derive_item_seed, magnify
from common.data.dicom import decode_dicom
from common.data.masks import box_mask, resize_image
from common.data.rsna import IMAGES_DIR
from common.style import AcquisitionStyle

SIZE = 64


SMALL = 6  # images in the writable copy, to keep each cache build short


@pytest.fixture
def rsna_copy(rsna_sample, tmp_path) -> Path:
    """A writable RSNA folder with the sample's first 6 patients: CSV rows copied, DICOMs linked."""
    root = tmp_path / "rsna"
    (root / IMAGES_DIR).mkdir(parents=True)
    images = sorted((rsna_sample / IMAGES_DIR).glob("*.dcm"))[:SMALL]
    keep = {path.stem for path in images}
    for path in rsna_sample.glob("*.csv"):
        lines = path.read_text().splitlines(keepends=True)
        rows = [line for line in lines[1:] if line.split(",", 1)[0] in keep]
        (root / path.name).write_text(lines[0] + "".join(rows))
    for path in images:
        (root / IMAGES_DIR / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="module")
def sample_cache(rsna_sample, tmp_path_factory):
    return open_cache(rsna_sample, SIZE, cache_dir=tmp_path_factory.mktemp("cache"))


def test_cache_matches_direct_decoding(sample_cache, rsna_sample):
    loaded = load_dataset(rsna_sample)
    assert sample_cache.ids == [r.patient_id for r in loaded.records]
    assert sample_cache.images.shape == (16, SIZE, SIZE)
    assert sample_cache.images.dtype == np.uint8
    assert sample_cache.masks.dtype == np.uint8
    for index, record in enumerate(loaded.records):
        expected = resize_image(decode_dicom(record.image_path), SIZE)
        np.testing.assert_allclose(sample_cache.image(index), expected, atol=0.5 / 255 + 1e-6)
        mask = box_mask(record.boxes, rows=1024, columns=1024, size=SIZE)
        np.testing.assert_array_equal(sample_cache.mask(index), mask)


def test_cache_frame_and_positions(sample_cache):
    frame = sample_cache.frame
    assert list(frame["patient_id"]) == sample_cache.ids
    assert int(frame["target"].sum()) == 5
    assert int(frame["n_boxes"].sum()) == 10
    assert str(frame["PatientAge"].dtype) == "Int64"
    assert sample_cache.position(sample_cache.ids[7]) == 7
    with pytest.raises(KeyError, match="not in the cache"):
        sample_cache.position("no-such-patient")
    positives = np.flatnonzero(sample_cache.masks.reshape(16, -1).any(axis=1))
    assert list(positives) == list(np.flatnonzero(frame["target"].to_numpy()))


def test_cache_reused_without_rebuild(rsna_copy, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    first = open_cache(rsna_copy, 32, cache_dir=tmp_path)
    assert "building the 32 px cache" in caplog.text
    caplog.clear()
    second = open_cache(rsna_copy, 32, cache_dir=tmp_path)
    assert "reusing the 32 px cache" in caplog.text
    assert "building" not in caplog.text
    assert second.path == first.path
    assert isinstance(second.images, np.memmap)


def test_cache_never_writes_under_root(rsna_copy, tmp_path):
    before = sorted(p.relative_to(rsna_copy) for p in rsna_copy.rglob("*"))
    open_cache(rsna_copy, 32, cache_dir=tmp_path / "cache")
    assert sorted(p.relative_to(rsna_copy) for p in rsna_copy.rglob("*")) == before


def test_cache_rebuilt_when_file_changes(rsna_copy, tmp_path):
    old = open_cache(rsna_copy, 32, cache_dir=tmp_path / "cache")
    image = next((rsna_copy / IMAGES_DIR).glob("*.dcm"))
    data = image.read_bytes()
    image.unlink()
    image.write_bytes(data)  # same pixels, new file: the key follows size and mtime
    new = open_cache(rsna_copy, 32, cache_dir=tmp_path / "cache")
    assert new.path != old.path
    assert not old.path.exists()  # the stale entry of the same root and size is removed


def test_cache_rebuilt_when_labels_change(rsna_copy, tmp_path):
    key = cache_key(rsna_copy, 32)
    labels = rsna_copy / "stage_2_train_labels.csv"
    assert "264,152,213,379" in labels.read_text()
    labels.write_text(labels.read_text().replace("264,152,213,379", "264,152,213,378"))
    assert cache_key(rsna_copy, 32) != key
    cache = open_cache(rsna_copy, 32, cache_dir=tmp_path / "cache")
    assert cache.path.name.endswith(cache_key(rsna_copy, 32)[:16])


def test_cache_key_depends_on_size(rsna_sample):
    assert cache_key(rsna_sample, 32) != cache_key(rsna_sample, 64)
    assert cache_key(rsna_sample, 32) == cache_key(rsna_sample, 32)


def test_cache_skips_undecodable_image(rsna_copy, tmp_path, caplog):
    victim = sorted((rsna_copy / IMAGES_DIR).glob("*.dcm"))[3]
    data = victim.read_bytes()
    victim.unlink()
    # Corrupt the JPEG frame header (SOF0 -> SOF15); the DICOM structure stays intact.
    victim.write_bytes(data.replace(b"\xff\xc0", b"\xff\xcf", 1))
    cache = open_cache(rsna_copy, 32, cache_dir=tmp_path / "cache", max_failure_fraction=0.2)
    assert len(cache) == SMALL - 1
    assert victim.stem not in cache.ids
    assert cache.images.shape == (SMALL - 1, 32, 32)
    assert cache.meta["issue_counts"] == {"decode_failed": 1}
    assert str(victim) in caplog.text
    # Reopening checks the stored counts against the stricter default of 10 %.
    with pytest.raises(ValueError, match=r"1 of 6 images failed \(16\.7%\)"):
        open_cache(rsna_copy, 32, cache_dir=tmp_path / "cache")


def test_concurrent_opens_build_once(rsna_copy, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    paths: list[Path] = []

    def open_one() -> None:
        paths.append(open_cache(rsna_copy, 32, cache_dir=tmp_path / "cache").path)

    threads = [threading.Thread(target=open_one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1
    assert caplog.text.count("building the 32 px cache") == 1
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir().name == "cache"


def test_invalid_image_size_rejected(rsna_sample, tmp_path):
    with pytest.raises(ValueError, match="got 0"):
        open_cache(rsna_sample, 0, cache_dir=tmp_path)


def test_decode_record_non_square_stretch(tmp_path):
    from PIL import Image

    from common.data.records import Box, Record

    pixels = np.zeros((40, 80), dtype=np.uint8)
    pixels[:, 40:] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    record = Record("a", tmp_path / "a.png", 1, "Lung Opacity", boxes=(Box(40, 10, 40, 20),))
    image, mask = decode_record(record, 20)
    # x scales by 20/80 and y by 20/40: the box becomes [10, 20) x [5, 15).
    assert mask.sum() == 10 * 10
    assert mask[5:15, 10:20].all()
    np.testing.assert_allclose(image[:, :10], 0.0, atol=1e-6)
    np.testing.assert_allclose(image[:, 10:], 1.0, atol=1e-6)


def test_dataset_items(sample_cache):
    ids = sample_cache.ids[::-1][:5]
    dataset = SegmentationDataset(sample_cache, ids)
    assert len(dataset) == 5
    image, mask = dataset[0]
    assert image.shape == (1, SIZE, SIZE)
    assert image.dtype == torch.float32
    assert mask.dtype == torch.float32
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    position = sample_cache.position(ids[0])
    np.testing.assert_array_equal(image[0].numpy(), sample_cache.image(position))
    assert dataset.targets == [int(sample_cache.frame["target"].iat[sample_cache.position(i)]) for i in ids]
    with pytest.raises(IndexError):
        dataset[5]


def test_dataset_unknown_id_rejected(sample_cache):
    with pytest.raises(KeyError, match="ghost"):
        SegmentationDataset(sample_cache, ["ghost"])


def test_dataset_style_deterministic(sample_cache):
    style = AcquisitionStyle(contrast=1.2, gamma=0.9, noise_std=0.05)
    first = SegmentationDataset(sample_cache, sample_cache.ids[:2], style=style, style_seed=3)
    again = SegmentationDataset(sample_cache, sample_cache.ids[:2], style=style, style_seed=3)
    other = SegmentationDataset(sample_cache, sample_cache.ids[:2], style=style, style_seed=4)
    plain = SegmentationDataset(sample_cache, sample_cache.ids[:2])
    assert torch.equal(first[0][0], again[0][0])
    assert torch.equal(first[0][0], first[0][0])
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], plain[0][0])
    assert torch.equal(first[0][1], plain[0][1])  # the style leaves the mask alone
    assert derive_item_seed(3, 0) != derive_item_seed(3, 1)


def test_magnify_zooms_image_and_mask_together():
    image = np.zeros((40, 40), dtype=np.float32)
    mask = np.zeros((40, 40), dtype=np.uint8)
    image[15:25, 15:25] = 1.0
    mask[15:25, 15:25] = 1
    zoomed_image, zoomed_mask = magnify(image, mask, 2.0)
    # A 10-pixel square about the centre becomes 20 pixels wide.
    assert int(zoomed_mask.sum()) == 400
    assert zoomed_mask[10:30, 10:30].all()
    assert float(zoomed_image[12:28, 12:28].min()) == pytest.approx(1.0)


@pytest.mark.slow
def test_parallel_build_equals_serial(rsna_copy, tmp_path, monkeypatch):
    import common.data.cache as cache_module

    monkeypatch.setattr(cache_module, "PARALLEL_MIN_PIXELS", 0)
    parallel = open_cache(rsna_copy, 32, cache_dir=tmp_path / "parallel", workers=2)
    serial = open_cache(rsna_copy, 32, cache_dir=tmp_path / "serial", workers=1)
    assert parallel.ids == serial.ids
    np.testing.assert_array_equal(np.asarray(parallel.images), np.asarray(serial.images))
    np.testing.assert_array_equal(np.asarray(parallel.masks), np.asarray(serial.masks))
