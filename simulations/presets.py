"""Named starting points of ``dpfedseg compare``: ``demo`` (the default) and ``paper``.

A preset fixes the run settings, the methods, setups and seeds, and where the data comes
from. Every value can be overridden on the command line.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common import atomic
from common.runtime import state_dir

log = logging.getLogger(__name__)

DEMO_DATA_DIR = "demo-data"
"""Folder under the project state folder where synthetic demo datasets are cached."""

_COMPLETE_MARKER = ".complete.json"


@dataclass(frozen=True)
class SyntheticData:
    """A synthetic RSNA-layout dataset, generated on first use and cached by its settings.

    Attributes:
        images: number of images (patients).
        image_size: side of the written DICOMs in pixels.
        seed: seed of the generator.
    """

    images: int
    image_size: int
    seed: int = 0

    def folder(self) -> Path:
        """Return the cache folder of this dataset (``<state dir>/demo-data/<settings>``)."""
        name = f"rsna-synthetic-{self.images}img-{self.image_size}px-seed{self.seed}"
        return state_dir() / DEMO_DATA_DIR / name

    def ensure(self) -> Path:
        """Return the dataset folder, generating it first when it is missing or incomplete.

        A marker file, written after generation, distinguishes a finished dataset from an
        interrupted generation; an unfinished folder is deleted and generated again.
        """
        folder = self.folder()
        if (folder / _COMPLETE_MARKER).is_file():
            log.info("using cached synthetic data in %s", folder)
            return folder
        if folder.exists():
            log.warning("synthetic data in %s is incomplete; generating it again", folder)
            shutil.rmtree(folder)
        from common.data import synthesize

        log.info("generating %d synthetic RSNA-style images in %s (first use only)",
                 self.images, folder)
        synthesize(folder, images=self.images, seed=self.seed, image_size=self.image_size)
        atomic.write_json(folder / _COMPLETE_MARKER, {"images": self.images,
                                                       "image_size": self.image_size,
                                                       "seed": self.seed})
        return folder


@dataclass(frozen=True)
class Preset:
    """One named configuration of the comparison.

    Attributes:
        name: the ``--preset`` value.
        description: one line for ``--help``.
        config: run settings (``RunConfig`` field names) that differ from the defaults.
        methods: methods compared.
        setups: site setups.
        seeds: seeds.
        site_options: partition settings (``SiteSettings`` field names) beyond the setup,
            the number of sites and the seed.
        synthetic: the generated dataset to use, or None when the user must pass ``--data``.
    """

    name: str
    description: str
    config: Mapping[str, Any]
    methods: tuple[str, ...]
    setups: tuple[str, ...]
    seeds: tuple[int, ...]
    site_options: Mapping[str, Any] = field(default_factory=dict)
    synthetic: SyntheticData | None = None


DEMO = Preset(
    name="demo",
    description=(
        "synthetic RSNA-style data generated on first use, 3 sites, 64 px, ResNet18 U-Net, "
        "3 rounds; a few minutes on a 2-core CPU"
    ),
    config={
        "encoder": "resnet18",
        "image_size": 64,
        "num_sites": 3,
        "num_server_rounds": 3,
        "local_epochs": 1,
        "batch_size": 8,
        "learning_rate": 0.05,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "target_epsilon": 8.0,
        "delta": 1e-5,
    },
    methods=("rs", "automatic"),
    setups=("iid",),
    seeds=(0,),
    site_options={"min_site_size": 20},
    synthetic=SyntheticData(images=180, image_size=128, seed=0),
)

PAPER = Preset(
    name="paper",
    description=(
        "reference configuration for the real RSNA data (--data DIR) on a GPU: ResNet34 "
        "U-Net, 256 px, noise multiplier 1.0, max grad norm 1.0, target epsilon 8, "
        "delta 1e-5, 5 sites, 3 seeds"
    ),
    config={
        "encoder": "resnet34",
        "image_size": 256,
        "num_sites": 5,
        "num_server_rounds": 30,
        "local_epochs": 1,
        "batch_size": 64,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "target_epsilon": 8.0,
        "delta": 1e-5,
    },
    methods=("rs", "automatic"),
    setups=("iid", "label-skew", "quantity-skew", "scanner-shift"),
    seeds=(0, 1, 2),
    site_options={"holdout_fraction": 0.0},
)

PRESETS = {preset.name: preset for preset in (DEMO, PAPER)}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; raise ValueError listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None

