"""Every shipped config parses into an ExperimentConfig and opens with the command that runs it."""

from pathlib import Path

import pytest

from jbilevel import config, experiment

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_shipped_config_loads(path):
    first = path.read_text().splitlines()[0]
    assert first == (f"# jbilevel train --config {path.relative_to(ROOT)} "
                     f"--out runs/{path.stem}")
    cfg = config.load(experiment.ExperimentConfig, path)
    if path.stem.endswith("_online"):  # online generation on top of bmo or bds
        assert cfg.online.every > 0 and cfg.method.method in ("bmo", "bds")
    else:
        assert cfg.method.method == path.stem.split("_")[-1]


def test_configs_exist():
    assert len(CONFIGS) >= 7


LLM = {"pythia1b_bmo.yaml": ("full", 1e-5), "llama3_8b_lora_bmo.yaml": ("lora", 5e-6),
       "llama3_8b_lora_safety_bmo.yaml": ("lora", 5e-6)}


@pytest.mark.parametrize("name", sorted(LLM))
def test_llm_configs_paper_defaults_and_meshes(name):
    path = Path(__file__).parent.parent / "configs" / name
    cfg = config.load(experiment.ExperimentConfig, path)
    kind, lr_theta = LLM[name]
    m = cfg.method
    assert (cfg.theta.kind, m.lr_theta, m.lr_omega, m.b1, m.b2, m.clip) == (
        kind, lr_theta, 1e-4, 0.9, 0.95, 1.0)
    assert (m.lam, m.lam_decay, cfg.model.compute_dtype) == (0.5, 0.1, "bfloat16")
    if kind == "lora":
        assert (cfg.theta.rank, cfg.theta.targets) == (16, ("q_proj", "v_proj"))
    assert cfg.model.path and cfg.data.train and cfg.data.validation
    assert cfg.data.length_buckets == 4  # SFT data of mixed lengths: batches cut to them
    assert cfg.model.path in path.read_text().split("\nmodel:")[0]  # documented in the header
    # Pod slices (16 and 64 chips) as shipped; one 8-GPU host with the documented override.
    _pod_meshes(path, cfg)
    if cfg.model.param_dtype == "bfloat16":  # an 8B base gathered whole does not fit a v5e
        assert not cfg.online.gather_params  # chip (compile_check.py --config, docs/scale.md)


def _pod_meshes(path, cfg):
    """Pod slices (16 and 64 chips) as shipped; one 8-GPU host with the documented override:
    every batch splits over the data-parallel devices."""
    gpu = config.load(experiment.ExperimentConfig, path, ["mesh.fsdp=8", "model.attention=cudnn"])
    assert gpu.model.attention == "cudnn"
    batches = [cfg.batch_size, cfg.val_batch_size, cfg.eval_batch_size]
    if cfg.method.method == "bds":
        batches.append(cfg.hyper_batch_size)
    if cfg.online.enabled:
        batches += [cfg.online.batch_size, cfg.online.generate_batch_size]
    for mesh, devices in ((cfg.mesh, 16), (cfg.mesh, 64), (gpu.mesh, 8)):
        data, fsdp, tensor = mesh.resolve(devices)
        assert all(b % (data * fsdp) == 0 for b in batches), (devices, batches)
    assert "`mesh.fsdp=8 model.attention=cudnn`" in path.read_text()


def test_llm_bds_online_config():
    """The pod recipe of the main method: bds with online generation over LoRA, the weights
    split while decoding (gathered, the bf16 8B base does not fit a v5e chip)."""
    path = Path(__file__).parent.parent / "configs" / "llama3_8b_lora_bds_online.yaml"
    cfg = config.load(experiment.ExperimentConfig, path)
    assert (cfg.method.method, cfg.theta.kind, cfg.model.param_dtype) == ("bds", "lora",
                                                                          "bfloat16")
    assert cfg.online.enabled and not cfg.online.gather_params
    assert cfg.method.hessian_rows <= cfg.hyper_batch_size
    assert cfg.data.length_buckets == 4
    _pod_meshes(path, cfg)
