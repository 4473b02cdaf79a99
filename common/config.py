"""The run configuration, parsed once from Flower's ``run_config`` into a frozen object.

Keys are the kebab-case names of ``[tool.flwr.app.config]`` in ``pyproject.toml``; fields
are the same names in snake_case. Every value is validated when the object is built, and
an error names the key, the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

METHODS = ("none", "flat", "automatic", "adaptive", "rs", "rs-automatic")
"""Training methods: non-private, Abadi flat clipping, automatic clipping (AUTO-S),
adaptive quantile clipping, random sparsification, and the RS + AC hybrid."""

ACCOUNTANTS = ("rdp", "prv", "pld")
RS_REFRESH = ("round", "epoch")


@dataclass(frozen=True)
class RunConfig:
    """All settings of one federated run (one method, one setup, one seed)."""

    method: str = "rs"
    num_server_rounds: int = 3
    num_sites: int = 3
    fraction_train: float = 1.0
    local_epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 0.05
    momentum: float = 0.0
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float = 8.0
    delta: float = 1e-5
    calibrate_noise: bool = False
    accountant: str = "rdp"
    ac_gamma: float = 0.01
    rs_final_rate: float = 0.9
    rs_refresh: str = "round"
    adaptive_target_quantile: float = 0.5
    adaptive_clip_lr: float = 0.2
    adaptive_count_noise: float = 10.0
    secure_rng: bool = False
    encoder: str = "resnet34"
    group_norm_groups: int = 8
    image_size: int = 64
    seed: int = 0
    data_dir: str = ""
    manifest: str = ""
    output_dir: str = "outputs/run"
    cache_dir: str = ""
    site_dir: str = ""
    init_weights: str = ""
    resume: bool = False
    round_timeout: int = 3600

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("accountant", self.accountant, ACCOUNTANTS)
        _check_choice("rs-refresh", self.rs_refresh, RS_REFRESH)
        _check_range("num-server-rounds", self.num_server_rounds, low=1)
        _check_range("num-sites", self.num_sites, low=1)
        _check_range("local-epochs", self.local_epochs, low=1)
        _check_range("batch-size", self.batch_size, low=1)
        _check_range("fraction-train", self.fraction_train, low=0.0, high=1.0, low_open=True)
        _check_range("learning-rate", self.learning_rate, low=0.0, low_open=True)
        _check_range("momentum", self.momentum, low=0.0, high=1.0)
        _check_range("noise-multiplier", self.noise_multiplier, low=0.0)
        _check_range("max-grad-norm", self.max_grad_norm, low=0.0, low_open=True)
        _check_range("target-epsilon", self.target_epsilon, low=0.0, low_open=True)
        _check_range("delta", self.delta, low=0.0, high=1.0, low_open=True, high_open=True)
        _check_range("ac-gamma", self.ac_gamma, low=0.0)
        _check_range("rs-final-rate", self.rs_final_rate, low=0.0, high=1.0, high_open=True)
        _check_range("adaptive-target-quantile", self.adaptive_target_quantile, low=0.0, high=1.0)
        _check_range("adaptive-clip-lr", self.adaptive_clip_lr, low=0.0)
        _check_range("adaptive-count-noise", self.adaptive_count_noise, low=0.0, low_open=True)
        _check_range("seed", self.seed, low=0)
        _check_range("round-timeout", self.round_timeout, low=1)
        _check_encoder(self.encoder)
        _check_range("group-norm-groups", self.group_norm_groups, low=1)
        _check_range("image-size", self.image_size, low=32)
        if self.image_size % 32:
            raise ValueError(
                f"image-size must be a multiple of 32 for a 5-stage U-Net encoder, got "
                f"{self.image_size}; use for example {32 * max(1, round(self.image_size / 32))}"
            )
        if self.method != "none" and self.noise_multiplier == 0 and not self.calibrate_noise:
            raise ValueError(
                f"method {self.method!r} with noise-multiplier 0 gives no privacy; set a "
                "positive noise-multiplier, calibrate-noise = true, or method = 'none'"
            )

    @property
    def private(self) -> bool:
        """Whether this run trains with DP-SGD (every method but ``none``)."""
        return self.method != "none"

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build the config from Flower's ``context.run_config`` (kebab-case keys).

        Unknown keys are rejected so that a misspelt override never passes silently.
        """
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                valid = ", ".join(sorted(n.replace("_", "-") for n in known))
                raise ValueError(f"unknown run-config key {key!r}; valid keys: {valid}")
            values[name] = _coerce(key, raw, known[name].type)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Return the kebab-case mapping that ``from_run_config`` reads back."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "RunConfig":
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _coerce(key: str, raw: Any, type_name: Any) -> Any:
    type_name = type_name if isinstance(type_name, str) else type_name.__name__
    try:
        if type_name == "bool":
            if isinstance(raw, str):
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                return raw.lower() in ("true", "1")
            return bool(raw)
        if type_name == "int":
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        if type_name == "float":
            return float(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ValueError(f"run-config key {key!r} expects a {type_name}, got {raw!r}") from None


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _check_encoder(name: str) -> None:
    if name not in _encoder_names():
        raise ValueError(
            f"encoder must be a segmentation-models-pytorch encoder name, got {name!r}; "
            "for example resnet18 or resnet34 (list them with "
            "segmentation_models_pytorch.encoders.get_encoder_names())"
        )


@functools.lru_cache(maxsize=1)
def _encoder_names() -> frozenset[str]:
    from segmentation_models_pytorch.encoders import get_encoder_names

    return frozenset(get_encoder_names())


def _check_range(
    key: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    # NaN fails every comparison, so it is rejected on its own: a NaN noise multiplier
    # used to pass here and reach the sites and the accountant.
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{key} must lie in {bounds}; got {value!r}")
