"""Compile-only memory check (jbilevel.aot) on the 8 fake CPU test devices."""

import dataclasses
import re
import types

import jax
import pytest

from jbilevel import aot
from jbilevel.algorithms import MethodConfig
from jbilevel.models import ModelConfig
from jbilevel.models.presets import param_count, preset, with_layers
from jbilevel.sharding import MeshConfig

TINY = ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, intermediate_size=128)


def test_presets_match_the_published_parameter_counts():
    # EleutherAI/pythia-1b: 1,011,781,632; Meta-Llama-3-8B: 8,030,261,248 (HF model cards).
    assert param_count(preset("pythia-1b")) == 1_011_781_632
    assert param_count(preset("llama-3-8b")) == 8_030_261_248
    assert param_count(preset("qwen2.5-0.5b")) == 494_032_768  # the model cards
    assert param_count(preset("qwen2.5-1.5b")) == 1_543_714_304
    assert param_count(preset("qwen3-1.7b")) == 1_720_574_976  # 1.41B without the embedding
    assert param_count(preset("qwen3-8b")) == 8_190_735_360  # 6.95B without the embeddings
    assert param_count(preset("gemma-2-2b")) == 2_614_341_888
    gemma3 = preset("gemma-3-1b")
    assert param_count(gemma3) == 999_885_952
    assert gemma3.local_layers == tuple((i + 1) % 6 != 0 for i in range(26))  # 5 local : 1
    assert preset("llama-3-8b", num_layers=2).num_layers == 2
    assert preset("gemma-3-1b", num_layers=7).local_layers == (True,) * 5 + (False, True)
    # a checkpoint's config (compile_check --config --layers) keeps its pattern the same way
    gemma2 = with_layers(preset("gemma-2-2b"), 3)
    assert (gemma2.num_layers, gemma2.local_layers) == (3, (True, False, True))
    assert with_layers(TINY, 1).local_layers is None
    with pytest.raises(ValueError, match="available: pythia-1b, llama-3-8b"):
        preset("gpt-5")


def test_fsdp8_splits_params_and_optimizer_state_evenly():
    n = 8
    report = aot.compile_memory(TINY, MethodConfig(method="bmo"), MeshConfig(data=1, fsdp=n),
                                aot.Shapes(seq_len=16, batch_size=n, val_batch_size=n,
                                           hyper_batch_size=n, n_examples=1000),
                                devices=jax.devices()[:n])
    params = param_count(TINY)
    # f32 params + Adam mu and nu, plus Adam's int32 step count.
    assert report.state_total == 3 * 4 * params + 4
    assert report.state_per_device <= 1.25 * report.state_total / n
    assert report.state_ratio == pytest.approx(1.0, abs=1e-3)
    train = report.steps["train"]
    # XLA's own count of the inputs on a device: the state shard, omega (1000 logits and two
    # Adam moments, replicated) and one row of each of the two batches.
    assert report.state_per_device + 12_000 < train.argument < report.state_per_device + 14_000
    assert train.alias >= report.state_per_device  # the donated state is updated in place
    assert train.xla_peak is None  # reported for a TPU target only


def test_xla_peak_is_the_tpu_compilers_own():
    """On a TPU target a step's ``xla_peak`` is XLA's ``peak_memory_in_bytes`` (what the
    compiler holds against the chip), which overlaps buffers the sum ``peak`` adds up."""
    class Compiled:
        def memory_analysis(self):
            return types.SimpleNamespace(
                argument_size_in_bytes=10, output_size_in_bytes=10, alias_size_in_bytes=10,
                temp_size_in_bytes=50, generated_code_size_in_bytes=1, peak_memory_in_bytes=40)

    tpu = aot._memory(Compiled(), 1.0, "tpu")
    assert (tpu.peak, tpu.xla_peak) == (60, 40)
    assert aot._memory(Compiled(), 1.0, "cpu").xla_peak is None


def test_batch_must_split_over_the_mesh():
    with pytest.raises(ValueError, match="batch_size=4 must be a multiple .* size 8"):
        aot.compile_memory(TINY, MethodConfig(method="bmo"), MeshConfig(data=1, fsdp=8),
                           aot.Shapes(batch_size=4))


def test_list_eos_token_id_keeps_the_config_hashable():
    # Llama-3's config.json has eos_token_id [128001, 128009]; jit needs a hashable config.
    config = preset("llama-3-8b")
    assert config.eos_token_id == (128001, 128009)
    assert hash(config) == hash(preset("llama-3-8b"))
    assert config.to_hf()["eos_token_id"] == [128001, 128009]


def test_lora_state_counts_the_frozen_base_and_splits_evenly():
    from jbilevel.inputs import ThetaConfig

    n = 8
    report = aot.compile_memory(TINY, MethodConfig(method="sft"), MeshConfig(data=1, fsdp=n),
                                aot.Shapes(seq_len=16, batch_size=n, val_batch_size=n,
                                           hyper_batch_size=n, n_examples=1000),
                                devices=jax.devices()[:n],
                                theta=ThetaConfig(kind="lora", rank=4))
    # f32 base params (frozen, no moments) + adapters q (64->64) and v (64->32) at rank 4
    # over 2 layers with their Adam mu and nu, plus Adam's step count.
    adapters = 2 * 4 * ((64 + 64) + (64 + 32))
    assert report.state_total == 4 * param_count(TINY) + 3 * 4 * adapters + 4
    assert report.state_per_device <= 1.25 * report.state_total / n


def test_bds_hypergradient_compiles_with_the_trainers_length_cut():
    """With ``hyper_blocks`` (``data.length_buckets`` > 1) the hypergradient is compiled as the
    trainer runs it: a batch as wide as its longest block, each block's per-example term and
    Hessian products at its own length. 56 of 64 rows at 16 of 64 tokens need less scratch
    than all of them at 64 (the same program without the cut would need the same)."""
    from jbilevel.data.batching import hyper_cut

    n = 8
    shapes = aot.Shapes(seq_len=64, batch_size=n, val_batch_size=n, hyper_batch_size=64,
                        n_examples=64)
    method = MethodConfig(method="bds", hessian_rows=16, hyper_chunk=16)
    blocks, scales, every = hyper_cut([60] * 3 + [10] * 61, 64, (16, 64), n)
    assert (blocks, scales, every) == (((0, 8, 64), (8, 64, 16)), None, True)

    def hyper(**cut):
        return aot.compile_memory(TINY, method, MeshConfig(data=1, fsdp=n), shapes,
                                  devices=jax.devices()[:n], only=["hyper"], **cut).steps["hyper"]

    whole, cut = hyper(), hyper(hyper_blocks=blocks)
    assert cut.temp < 0.75 * whole.temp, (cut.temp, whole.temp)
    # the same batch, as wide as its longest block (64); that the program is the trainer's
    # own: tests/test_experiment_llm.py, where the run loads it from the cache
    assert cut.argument == whole.argument
    narrow = hyper(hyper_blocks=((0, 64, 32),))
    # a block of 32 tokens at most: a batch half as wide, 8 rows x 32 tokens x 16 bytes less
    assert whole.argument - narrow.argument == 8 * 32 * 16


def test_a_step_over_the_memory_limit_does_not_fit():
    """On GPUs (which compile whatever the memory and fail when the step runs) a step whose
    peak exceeds ``memory_limit`` is listed as not fitting, its figures still reported."""
    n = 8
    shapes = aot.Shapes(seq_len=16, batch_size=n, val_batch_size=n, hyper_batch_size=n,
                        n_examples=1000)

    def train(limit):
        return aot.compile_memory(TINY, MethodConfig(method="bmo"), MeshConfig(data=1, fsdp=n),
                                  shapes, devices=jax.devices()[:n], only=["train"],
                                  memory_limit=limit)

    fits = train(None)
    peak = fits.steps["train"].peak
    assert not fits.errors and not train(peak).errors  # exactly the limit fits
    over = train(peak - 1)
    assert over.steps["train"] == dataclasses.replace(fits.steps["train"],
                                                      compile_s=over.steps["train"].compile_s)
    assert re.fullmatch(r"needs [\d.]+ GiB a device \(arguments \+ outputs \+ temporaries\) "
                        r"of the [\d.]+ GiB it may use", over.errors["train"])


def test_compile_check_holds_gpu_steps_against_the_allocators_limit(monkeypatch, capsys):
    """``--platform gpu``: the least of the GPUs' allocator limits is what a step may use, and
    a step above it fails the check (faked here with CPU devices and a limit)."""
    from pathlib import Path

    import _llm

    script = _llm.script("compile_check")

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    assert script._memory_limit([Device({"bytes_limit": 9}), Device({"bytes_limit": 7})]) == 7
    assert script._memory_limit([Device({"bytes_limit": 9}), Device(None)]) is None
    monkeypatch.setattr(script, "_targets", lambda args: [("gpu x8", jax.devices()[:8])])
    monkeypatch.setattr(script, "_memory_limit", lambda devices: 2**20)
    config = Path(__file__).parents[1] / "configs" / "finetune" / "quality_mix.yaml"
    argv = ["--config", str(config), "--platform", "gpu", "--devices", "8", "--steps", "train",
            "--layers", "1"]
    assert script.main(argv) == 1
    out, err = capsys.readouterr()
    assert "gpu x8 data=8 fsdp=1: each device may use 0.00 GiB (its allocator's limit)" in out
    assert re.search(r"\| train \| .* \| does not fit: needs [\d.]+ GiB a device", out), out
    assert "FAIL: 1 step(s) do not fit the devices' memory" in err
    monkeypatch.setattr(script, "_memory_limit", lambda devices: 2**40)
    assert script.main(argv) == 0


def _online_setting():
    """(8, shapes, online settings, bds, an fsdp mesh of 8, the buffer's bytes a device): 100
    questions a refresh in calls of 32 prompts, 4 calls, 128 x 4 samples = 512 rows; split
    over the 8 devices, 5 int32/f32 arrays of 512 x 64 tokens, ids and valid, plus its
    replicated int32 step."""
    from jbilevel.algorithms.online import OnlineConfig

    n = 8
    shapes = aot.Shapes(seq_len=16, batch_size=n, val_batch_size=n, hyper_batch_size=n,
                        n_examples=1000, prompt_len=24, new_tokens=40)
    online = OnlineConfig(every=5, fraction=0.1, num_samples=4, batch_size=8,
                          generate_batch_size=32)
    buffer = (5 * 512 * 64 + 2 * 512) * 4 // n + 4
    return n, shapes, online, MethodConfig(method="bds"), MeshConfig(data=1, fsdp=n), buffer


@pytest.fixture(scope="module")
def full_online():
    """The online setting's four programs with full fine-tuning (compiled once: the LoRA
    test compares its sampler call and log pass with these)."""
    n, shapes, online, method, mesh, _ = _online_setting()
    return aot.compile_memory(TINY, method, mesh, shapes, devices=jax.devices()[:n],
                              online=online)


def test_online_adds_the_buffer_the_sampler_call_and_the_log_pass(full_online):
    from jbilevel.algorithms.online import OnlineConfig

    n, shapes, online, method, mesh, buffer = _online_setting()
    offline = aot.compile_memory(TINY, method, mesh, shapes, devices=jax.devices()[:n])
    report = full_online
    assert set(report.steps) == {"train", "hyper", "generate", "log ratios"}
    assert report.state_total == offline.state_total  # the buffer is data, not optimizer state
    for step in ("train", "hyper"):
        assert report.steps[step].argument == offline.steps[step].argument + buffer
    # a sampler call's 128 x 4 samples of 40 tokens (4 arrays) come out split over the devices
    assert report.steps["generate"].output < 2 * 4 * 512 * 40 * 4 // n
    # the log's ratio pass over a call's 512 / 4 = 128 rows: each device computes the logits of
    # its own rows only (1 MiB; unpinned, every device held all 8 MiB, and more)
    assert report.steps["log ratios"].temp < 128 * 64 * 256 * 4 // 2
    alone = aot.compile_memory(TINY, method, mesh, shapes, devices=jax.devices()[:n],
                               online=online, only=["generate"])
    assert list(alone.steps) == ["generate"]
    assert alone.steps["generate"].temp == report.steps["generate"].temp
    with pytest.raises(ValueError, match=r"only=\['log'\]: not a step .* train, hyper"):
        aot.compile_memory(TINY, method, mesh, shapes, devices=jax.devices()[:n],
                           only=["log"])
    with pytest.raises(ValueError, match="online.batch_size=4 must be a multiple .* size 8"):
        aot.compile_memory(TINY, method, mesh, shapes, devices=jax.devices()[:n],
                           online=OnlineConfig(every=5, batch_size=4))


def test_lora_online_compiles_over_the_frozen_base(full_online):
    """Online generation with LoRA adapters: the same four programs; the buffer adds to the
    train and hypergradient steps what it adds with full fine-tuning, and the sampler call
    and the log's ratio pass take the frozen base's shard plus the adapters (split like
    their kernels) where full fine-tuning's take theta's shard."""
    from jbilevel.inputs import ThetaConfig

    n, shapes, online, method, mesh, buffer = _online_setting()
    lora = ThetaConfig(kind="lora", rank=4)

    def report(theta, with_online):
        return aot.compile_memory(TINY, method, mesh, shapes, devices=jax.devices()[:n],
                                  theta=theta, online=online if with_online else None)

    adapted, offline, full = report(lora, True), report(lora, False), full_online
    assert set(adapted.steps) == {"train", "hyper", "generate", "log ratios"}
    assert adapted.state_total == offline.state_total
    for step in ("train", "hyper"):
        assert adapted.steps[step].argument == offline.steps[step].argument + buffer
    a_bytes, b_bytes = 4 * 2 * 4 * (64 + 64), 4 * 2 * 4 * (64 + 32)  # q and v at rank 4
    for step in ("generate", "log ratios"):
        assert adapted.steps[step].argument - full.steps[step].argument == a_bytes // n + b_bytes


def test_evaluate_compiles_the_final_evaluations_decoding_batch():
    """Asked for by name: one decoding batch of the final evaluation, a LoRA run's adapters
    decoded unmerged over its frozen base (the base's shard and the adapters its inputs)."""
    from jbilevel.inputs import ThetaConfig

    n = 8
    shapes = aot.Shapes(seq_len=16, batch_size=n, val_batch_size=n, hyper_batch_size=n,
                        n_examples=1000, prompt_len=24, new_tokens=8, eval_batch_size=16)
    method, mesh = MethodConfig(method="sft"), MeshConfig(data=1, fsdp=n)
    reports = {kind: aot.compile_memory(TINY, method, mesh, shapes, devices=jax.devices()[:n],
                                        theta=ThetaConfig(kind=kind, rank=4),
                                        only=["evaluate"])
               for kind in ("full", "lora")}
    assert [list(r.steps) for r in reports.values()] == [["evaluate"], ["evaluate"]]
    full, adapted = (reports[k].steps["evaluate"] for k in ("full", "lora"))
    # f32 adapters of q (64 -> 64) and v (64 -> 32) at rank 4 over 2 layers, split like
    # their kernels: A (in, r) on the embedding over fsdp, B (r, out) on heads (no fsdp: whole)
    a_bytes, b_bytes = 4 * 2 * 4 * (64 + 64), 4 * 2 * 4 * (64 + 32)
    assert adapted.argument - full.argument == a_bytes // n + b_bytes
    # 4 prompts pad to a batch of 8, as the run pads them (one row a device): a row of 24
    # prompt ids and mask entries less a device than the batch of 16
    padded = aot.compile_memory(TINY, method, mesh, dataclasses.replace(shapes, eval_batch_size=4),
                                devices=jax.devices()[:n], only=["evaluate"]).steps["evaluate"]
    assert full.argument - padded.argument == 2 * 24 * 4


def test_the_final_evaluation_is_compiled_at_the_scored_splits_lengths(tmp_path, capsys,
                                                                         cache_state):
    """With the data read, ``evaluate`` is the run's first decoding batch of the splits it
    scores: their longest prompt, their longest reference answer as the budget, the batch
    padded to the devices; compiled by default for a run that scores its answers, and kept in
    the compilation cache, the run's final evaluation loads it.
    (On one device the run decodes off the mesh, and so does the check: not testable in this
    process of 8 devices.)"""
    from pathlib import Path

    import _llm

    from jbilevel import config, experiment
    from jbilevel.console import QUIET, Console

    path = Path(__file__).parents[1] / "configs" / "finetune" / "quality_mix.yaml"
    overrides = ["task.options.n_train=64", "task.options.n_val=16", "task.options.n_test=24",
                 "batch_size=8", "val_batch_size=8", "eval_batch_size=12", "loop.steps=1",
                 "loop.eval_every=0",
                 "online.max_new_tokens=9"]  # a sampler's budget, not the evaluation's
    cfg = experiment.resolve(config.load(experiment.ExperimentConfig, path, overrides),
                             tmp_path / "task", write=True)
    task = experiment.load_data(cfg, Console(QUIET))
    decoded = [task.splits[s] for s in task.scored]
    assert len(decoded) == 2  # validation and test
    shapes, source = aot.run_shapes(cfg, task.train, task.validation, decoded=decoded)
    prompt = max(int(d.prompt_len_N.max()) for d in decoded)
    answer = max(int((d.length_N - d.prompt_len_N).max()) for d in decoded)
    assert (shapes.eval_prompt_len, shapes.eval_new_tokens) == (prompt, answer)
    assert shapes.new_tokens == 9 != answer
    assert f"the final evaluation decodes prompts of at most {prompt} tokens for {answer}" in source
    cache = tmp_path / "cache"
    assert _llm.script("compile_check").main([
        "--config", str(path), *overrides, "--platform", "cpu", "--devices", "8",
        "--compile-cache", str(cache)]) == 0
    steps = re.findall(r"\| cpu x8 data=8 fsdp=1 \| ([a-z ]+) \|", capsys.readouterr().out)
    assert steps == ["train", "eval loss", "evaluate"]
    jax.clear_caches()  # as a new process: what it does not compile comes from the cache
    experiment.run(config.load(experiment.ExperimentConfig, path, overrides), tmp_path / "run",
                   console=Console(QUIET))
    entries = _llm.cached_programs(cache)
    # the run's greedy decoding (both splits: one program) found there, not compiled again
    assert entries.count("jit__generate") == 1, entries


def test_a_built_in_task_without_its_data_compiles_the_shipped_base(capsys):
    """``--no-data`` with a built-in task: its files are neither written nor read, but its
    settings hold: the shipped base's architecture (its config.json) and the metric that makes
    the run decode its answers, so the final evaluation is compiled by default. An unknown
    ``--model`` preset is refused by name."""
    from pathlib import Path

    import _llm

    from jbilevel.models import base_model_path, read_config

    path = Path(__file__).parents[1] / "configs" / "finetune" / "quality_mix.yaml"
    check = _llm.script("compile_check")
    assert check.main(["--config", str(path), "--no-data", "data.max_len=24", "--n-examples",
                       "64", "--platform", "cpu", "--devices", "8"]) == 0
    out = capsys.readouterr().out
    layers = read_config(base_model_path("pretrained")).num_layers
    assert f"quality_mix.yaml: base, 0.001B parameters compiled ({layers} layers)" in out
    assert re.findall(r"\| cpu x8 data=8 fsdp=1 \| ([a-z ]+) \|", out) == [
        "train", "eval loss", "evaluate"]  # the loss pass at data.max_len
    with pytest.raises(SystemExit, match="--model: unknown model preset 'tiny' \\(available: "):
        check.main(["--config", str(path), "--no-data", "--model", "tiny", "--platform", "cpu",
                    "--devices", "8"])


def test_without_the_data_the_sampler_stops_at_the_tokenizers_end_tokens(tmp_path, capsys):
    """``--no-data`` with ``model.path`` on the machine: the architecture is its config.json and
    the sampler stops at its tokenizer's end tokens (here eos and the id generation_config.json
    adds), as the run's does, not at one assumed end token."""
    import json
    from pathlib import Path

    import _llm

    model = _llm.model_dir(tmp_path)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    path = Path(__file__).parents[1] / "configs" / "llama3_8b_lora_bds_online.yaml"
    assert _llm.script("compile_check").main([
        "--config", str(path), "--no-data", f"model.path={model}", "data.max_len=32",
        "mesh.fsdp=8", "online.max_new_tokens=4", "online.generate_batch_size=8",
        "online.batch_size=8", "--n-examples", "64", "--steps", "generate", "--platform",
        "cpu", "--devices", "8", "--max-ratio", "10"]) == 0  # (a tiny model's state)
    out = capsys.readouterr().out
    assert f"{path}: llama, 0.000B parameters compiled (2 layers)" in out
    assert "while decoding, stopping at 2 end tokens" in out
    assert re.findall(r"\| cpu x8 data=1 fsdp=8 \| ([a-z ]+) \|", out) == ["generate"]


def test_a_run_configuration_compiles_with_its_own_shapes(tmp_path, capsys):
    """``compile_check.py --config``: the run's own method, online settings and batch sizes
    over its mesh, at its data's lengths as the trainer pads them (or, without the data,
    data.max_len's bounds); flags the configuration sets are refused, naming its field."""
    from pathlib import Path

    import _llm

    from jbilevel import config, experiment
    from jbilevel.console import QUIET, Console
    from jbilevel.data.batching import Batcher

    root = Path(__file__).parents[1]
    script = _llm.script("compile_check")
    path = root / "configs" / "finetune" / "coverage_online.yaml"
    cfg = config.load(experiment.ExperimentConfig, path, ["data.length_buckets=4"])
    cfg = experiment.resolve(cfg, tmp_path, write=True)
    task = experiment.load_data(cfg, Console(QUIET))
    train, val = task.train, task.validation
    shapes, source = aot.run_shapes(cfg, train, val)
    widths = [{b["input_ids"].shape[1] for b in Batcher(data, size, **kw).epoch_batches()}
              for data, size, kw in (
                  (train, cfg.batch_size, experiment.grouped(train, cfg.data)),
                  (val, cfg.val_batch_size, {"buckets": (experiment.longest_bucket(val),)}))]
    # the trainer's: training batches at their buckets' lengths, validation ones at one
    assert widths == [{24}, {24}] and (shapes.seq_len, shapes.val_seq_len) == (24, 24)
    assert (shapes.n_examples, shapes.hyper_batch_size) == (2000, 2000)  # bds: every row
    assert shapes.prompt_len == train.prompt_len_N.max() == 17
    assert shapes.new_tokens == (train.length_N - train.prompt_len_N).max() == 4  # max_new 0
    assert "2000 training rows" in source
    bounds, source = aot.run_shapes(cfg, n_examples=5000)
    assert (bounds.seq_len, bounds.prompt_len, bounds.new_tokens, bounds.n_examples) == (
        cfg.data.max_len, cfg.data.max_len - 1, cfg.data.max_len - 1, 5000)
    assert "no data read" in source

    assert script.main(["--config", str(path), "online.batch_size=8", "--platform", "cpu",
                        "--devices", "8", "--steps", "train", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "bds + online, theta full" in out and "1.0 x 2000 questions x 1 samples of 17 + 4" in out
    # the state is whole on every device of the data axis: 1x what it is split over
    row = re.search(r"\| instruct \(1L\) \| full \| bds\+online \| cpu x8 data=8 fsdp=1 \| "
                    r"train \| [\d.]+ \| [\d.]+ \| 1\.000 \|(.*)", out)
    assert row, out
    assert row[1].split("|")[-3].strip() == "-"  # XLA peak: a TPU target's only
    with pytest.raises(SystemExit, match="--seq-len: data.max_len; --theta: theta.kind"):
        script.main(["--config", str(path), "--platform", "cpu", "--devices", "8",
                     "--seq-len", "128", "--theta", "lora"])
    for argv in (["--platform", "tpu", "--topology", "v5e:2x4"], ["--platform", "cpu"]):
        with pytest.raises(SystemExit):  # a topology's programs, or a flags run, are no run's
            script.main((["--config", str(path)] if "tpu" in argv else []) + argv
                        + ["--compile-cache", str(tmp_path / "c")])
        assert "--compile-cache needs --config and --platform cpu or gpu" in capsys.readouterr().err
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"data: {{train: {tmp_path}/none.jsonl, validation: {tmp_path}/v.jsonl}}\n")
    with pytest.raises(SystemExit, match=r"data.train: .*none.jsonl: file not found.*\n"
                                         r"\(--no-data sizes the batches"):
        script.main(["--config", str(missing), "--platform", "cpu", "--devices", "8"])
    with pytest.raises(SystemExit, match="model.path=/data/models/llama-3-8b-instruct is not "
                                         "on this machine: name its architecture with --model"):
        script.main(["--config", str(root / "configs" / "llama3_8b_lora_bds_online.yaml"),
                     "--platform", "cpu", "--devices", "8"])
