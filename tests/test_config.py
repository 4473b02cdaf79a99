import pytest

from common.config import RunConfig


def test_run_config_round_trips():
    config = RunConfig(method="automatic", image_size=128, calibrate_noise=True)
    assert RunConfig.from_run_config(config.to_run_config()) == config


def test_run_config_coerces_flower_strings():
    config = RunConfig.from_run_config({"local-epochs": "2", "delta": "1e-5", "resume": "true"})
    assert config.local_epochs == 2
    assert config.delta == 1e-5
    assert config.resume is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "dp"}, "method must be one of"),
        ({"delta": 0.0}, "delta must lie in"),
        ({"image-size": 100}, "multiple of 32"),
        ({"rs-final-rate": 1.0}, "rs-final-rate must lie in"),
        ({"local-epochs": "1.5"}, "expects a int"),
        ({"learnign-rate": 0.1}, "unknown run-config key 'learnign-rate'"),
        ({"method": "flat", "noise-multiplier": 0.0}, "gives no privacy"),
        ({"noise-multiplier": "nan"}, r"noise-multiplier must lie in \[0.0, inf\); got nan"),
        ({"max-grad-norm": "inf"}, r"max-grad-norm must lie in \(0.0, inf\); got inf"),
        ({"target-epsilon": "nan"}, "target-epsilon must lie in"),
        ({"learning-rate": "nan"}, "learning-rate must lie in"),
        ({"delta": "nan"}, "delta must lie in"),
        ({"adaptive-count-noise": 0.0}, "adaptive-count-noise must lie in"),
        ({"adaptive-clip-lr": "nan"}, "adaptive-clip-lr must lie in"),
        ({"seed": -1}, r"seed must lie in \[0, inf\); got -1"),
        ({"encoder": "resnet999"}, "encoder must be a segmentation-models-pytorch encoder name, got 'resnet999'"),
    ],
)
def test_run_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_run_config(overrides)


def test_pyproject_app_config_parses():
    import tomllib

    from common.runtime import project_root

    pyproject = tomllib.loads((project_root() / "pyproject.toml").read_text())
    config = RunConfig.from_run_config(pyproject["tool"]["flwr"]["app"]["config"])
    assert config == RunConfig()
    assert config.noise_multiplier == 1.0
    assert config.max_grad_norm == 1.0
    assert config.target_epsilon == 8.0
    assert config.delta == 1e-5
