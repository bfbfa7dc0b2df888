"""Every shipped config parses into an ExperimentConfig and opens with the command that runs it."""

from pathlib import Path

import pytest

from jbilevel import config, experiment

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# jbilevel train --config configs/{path.name} --out runs/{path.stem}"
    cfg = config.load(experiment.ExperimentConfig, path)
    if path.stem.endswith("_online"):  # online generation on top of bmo or bds
        assert cfg.online.every > 0 and cfg.method.method in ("bmo", "bds")
    else:
        assert cfg.method.method == path.stem.split("_")[-1]


def test_configs_exist():
    assert len(CONFIGS) >= 4
