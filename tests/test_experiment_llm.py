"""Real-model runs end to end: a local HF model directory, SFT files, full FT and LoRA."""

import ast
import contextlib
import csv
import dataclasses
import json
import re
from pathlib import Path

import _llm
import jax
import numpy as np
import pytest

from jbilevel import config, experiment, inputs, train
from jbilevel.adjoint import Implicit
from jbilevel.algorithms import MethodConfig
from jbilevel.algorithms import online as online_lib
from jbilevel.data import load_sft
from jbilevel.models import load_pretrained
from jbilevel.objectives import lm_example_loss

DATA = _llm.DATA


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _llm.model_dir(tmp_path_factory.mktemp("model"))


def _cfg(model_dir, method, theta, **kw):
    return experiment.ExperimentConfig(
        data=inputs.DataConfig(train=str(DATA / "alpaca_cleaned.json"),
                               validation=str(DATA / "openorca.jsonl"),
                               test=str(DATA / "redorca.jsonl"), max_len=160),
        model=experiment.ModelSpec(path=str(model_dir)),
        theta=theta, method=MethodConfig(method=method, lr_theta=1e-2, lr_omega=0.1,
                                         hyper_every=2,
                                         hypergrad=Implicit("cg", maxiter=2, tol=0.0,
                                                            ridge=10.0)),
        loop=train.LoopConfig(steps=2, log_every=1, checkpoint_every=0, progress=False),
        batch_size=8, val_batch_size=8, eval_batch_size=8, **kw)


def _loss(model_path, split):
    forward, params, _ = load_pretrained(str(model_path))
    ds = load_sft(str(DATA / split), tokenizer=str(model_path), max_len=160)
    return experiment.mean_loss(lm_example_loss(forward), params, ds, 8)


@pytest.mark.parametrize("method,theta,case", [
    ("bmo", inputs.ThetaConfig(kind="lora", rank=4, alpha=8.0), "llama"),
    ("bds", inputs.ThetaConfig(kind="full"), "llama"),
    # hypergradients (forward mode, Hessian-vector products) through Gemma 3's q/k norms,
    # per-layer windows and RoPE, scanned with the layers
    ("bds", inputs.ThetaConfig(kind="full"), "gemma3_text"),
])
def test_pretrained_model_on_sft_files(tmp_path_factory, model_dir, method, theta, case):
    tmp_path = tmp_path_factory.mktemp("run")
    cfg = _cfg(model_dir, method, theta)
    if case != "llama":  # its random weights' Hessian needs more damping for 2 CG iterations
        model_dir = _llm.model_dir(tmp_path_factory.mktemp("model"), case)
        cfg = dataclasses.replace(
            _cfg(model_dir, method, theta), method=dataclasses.replace(
                cfg.method, hypergrad=Implicit("cg", maxiter=2, tol=0.0, ridge=1000.0)))
    result = experiment.run(cfg, tmp_path)
    assert result["steps"] == 2 and result["n_train"] == 3 and result["theta"] == theta.kind
    base_val = _loss(model_dir, "openorca.jsonl")
    # The saved model is a plain HF checkpoint (LoRA merged): its losses are the report's.
    np.testing.assert_allclose(_loss(tmp_path / "model", "openorca.jsonl"), result["val_loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(_loss(tmp_path / "model", "redorca.jsonl"), result["test_loss"],
                               rtol=1e-5)
    assert abs(result["val_loss"] - base_val) > 1e-4  # training changed the model
    with open(tmp_path / "weights.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["good"] for r in rows] == ["", "", ""]  # no ground truth for files
    assert rows[1]["preview"] == "Sum the numbers. | 2, 3 | 5"
    weights = np.load(tmp_path / "weights.npy")
    assert weights.shape == (3,) and np.ptp(weights) > 1e-4  # the weights were stepped
    assert "weight_auroc" not in result and "weight_ess" in result
    assert (tmp_path / "weights.png").exists() and (tmp_path / "curated.jsonl").exists()
    assert not (tmp_path / "test_predictions.jsonl").exists()
    assert (tmp_path / "model" / "tokenizer.json").exists()


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma2"])
def test_lora_run_keeps_the_base_frozen_and_resumes(tmp_path_factory, model_dir, case):
    """Qwen3 and Gemma 2 too: Qwen3's q adapter feeds the per-head q norm, Gemma 2's loss goes
    through its soft cap, as PEFT's and the merged model's (the losses and logits below)."""
    tmp_path = tmp_path_factory.mktemp("run")
    if case != "llama":
        model_dir = _llm.model_dir(tmp_path_factory.mktemp("model"), case)
    cfg = _cfg(model_dir, "sft", inputs.ThetaConfig(kind="lora", rank=2, alpha=4.0))
    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, eval_every=2))
    first = experiment.run(cfg, tmp_path)
    assert "lora_merge_error" not in first  # a float32 base: the merge is exact
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_val_loss"] == pytest.approx(first["val_loss"], rel=1e-5)  # adapters + base
    # ... and equal to the merged model's: the adapters sit where the merge puts them
    np.testing.assert_allclose(_loss(tmp_path / "model", "openorca.jsonl"), first["val_loss"],
                               rtol=1e-5)
    _, base, _ = load_pretrained(str(model_dir))
    _, saved, _ = load_pretrained(str(tmp_path / "model"))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         base, saved)
    assert moved["layers"]["q"]["kernel"] > 0 and moved["layers"]["v"]["kernel"] > 0
    assert moved["layers"]["k"]["kernel"] == 0 and moved["embed"]["embedding"] == 0
    # Checkpoints hold the adapters and optimizer states, not the frozen base.
    meta = json.loads((tmp_path / "checkpoints" / "2" / "state" / "_METADATA").read_text())
    paths = [ast.literal_eval(k) for k in meta["tree_metadata"]]
    assert any(p[0] == "theta" for p in paths)
    assert not [p for p in paths if p[0] == "frozen" and len(p) > 1]
    again = experiment.run(cfg, tmp_path)  # resumes from the final checkpoint, base reread
    assert again["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    # adapter/: the adapters alone, in PEFT's format, over the base they were trained on
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["target_modules"],
            adapter_cfg["base_model_name_or_path"]) == (2, 4.0, ["q_proj", "v_proj"],
                                                        str(model_dir))
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def hf(path):
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)

    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        merged = hf(tmp_path / "model")(ids).logits.numpy()
        assert np.abs(hf(model_dir)(ids).logits.numpy() - merged).max() > 1e-3  # it trained
        adapted = peft.PeftModel.from_pretrained(hf(model_dir), str(tmp_path / "adapter"))
        np.testing.assert_allclose(adapted(ids).logits.numpy(), merged, atol=1e-4, rtol=0)


def test_lora_merge_into_a_bfloat16_base_is_measured_and_warned_of(tmp_path, model_dir):
    """A LoRA run over a bfloat16 base is evaluated through its adapters unmerged (the function
    it trained) and says what merging them into model/ rounds away: a small step (lr 1e-4, two
    steps) makes an update the merge mostly loses."""
    import io

    from jbilevel import cli
    from jbilevel.console import Console

    lora = inputs.ThetaConfig(kind="lora", rank=2, alpha=4.0)
    cfg = _cfg(model_dir, "sft", lora)
    small = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, param_dtype="bfloat16"),
        method=dataclasses.replace(cfg.method, lr_theta=1e-4),
        loop=dataclasses.replace(cfg.loop, eval_every=2))
    out = io.StringIO()
    result = experiment.run(small, tmp_path, console=Console(stream=out))
    assert result["lora_merge_error"] >= experiment.MERGE_ERROR_WARN
    assert 0.3 < result["lora_merge_lost"] <= 1.0, result["lora_merge_lost"]
    assert ("warning: model/ will hold the adapters merged into the base's bfloat16 weights, "
            f"which round {result['lora_merge_lost']:.0%} of the update's elements") \
        in out.getvalue()
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["val_loss"] == pytest.approx(last["eval_val_loss"], rel=1e-6)
    assert cli.main(["eval", "--run", str(tmp_path), "-q"]) == 0  # the same, again
    assert json.loads((tmp_path / "eval.json").read_text())["val_loss"] == pytest.approx(
        result["val_loss"], rel=1e-6)


def test_data_and_model_errors_name_the_fix(tmp_path, model_dir):
    with pytest.raises(ValueError, match="data.validation is required"):
        inputs.DataConfig(train="x.jsonl")
    with pytest.raises(ValueError, match="set data.train"):
        experiment.run(experiment.ExperimentConfig(
            task=experiment.TaskConfig(base="scratch"),
            model=experiment.ModelSpec(path=str(model_dir))), tmp_path)
    with pytest.raises(ValueError, match="oracle.*built-in"):
        experiment.training_set(inputs.FileTask("f", None, {}), "oracle")


def test_results_json_round_trip(tmp_path, model_dir):
    result = experiment.run(_cfg(model_dir, "mix", inputs.ThetaConfig()), tmp_path)
    assert result["n_train"] == 6  # mix: alpaca train + openorca validation
    assert json.loads((tmp_path / "results.json").read_text()) == result


def test_shipped_llama3_lora_config_runs_on_the_tiny_fixture(tmp_path, model_dir):
    """The shipped LLM config as is (LoRA, bf16 base, remat, chat template, lam schedule, the
    8-GPU mesh override), with only paths, sizes and lengths pointed at the fixtures."""
    path = Path(__file__).parent.parent / "configs" / "llama3_8b_lora_bmo.yaml"
    cfg = config.load(experiment.ExperimentConfig, path, [
        f"model.path={model_dir}", f"data.train={DATA / 'alpaca_cleaned.json'}",
        f"data.validation={DATA / 'openorca.jsonl'}", f"data.test={DATA / 'redorca.jsonl'}",
        "data.max_len=192", "mesh.fsdp=8", "batch_size=8", "val_batch_size=8",
        "eval_batch_size=8", "loop.steps=2", "loop.steps_per_epoch=1", "loop.log_every=1",
        "loop.progress=false"])
    result = experiment.run(cfg, tmp_path)
    assert result["theta"] == "lora" and result["steps"] == 2
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lam"] for r in records] == pytest.approx([0.5, 0.4])  # -0.1 per epoch
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"


def test_compile_check_caches_every_program_an_online_run_compiles_first(tmp_path, model_dir,
                                                                         cache_state):
    """The shipped 8B LoRA bds + online config pointed at the fixtures, its first refresh at
    step 1: compile_check.py --config --compile-cache compiles the run's own programs (the
    offline train step before the refresh, the online train step, the hypergradient, the
    sampler with the tokenizer's stop ids at the longest prompt, the log's ratio pass, the
    final evaluation's loss pass), and the run, in a process that has compiled nothing, loads
    each of them from the cache. (With data.length_buckets > 1: the next tests.)"""
    import io

    from jbilevel.console import Console

    path = Path(__file__).parent.parent / "configs" / "llama3_8b_lora_bds_online.yaml"
    overrides = [
        f"model.path={model_dir}", f"data.train={DATA / 'alpaca_cleaned.json'}",
        f"data.validation={DATA / 'openorca.jsonl'}", f"data.test={DATA / 'redorca.jsonl'}",
        "data.max_len=192", "data.length_buckets=1", "mesh.fsdp=8", "batch_size=8",
        "val_batch_size=8", "eval_batch_size=8", "hyper_batch_size=8", "method.hessian_rows=8",
        "method.hyper_chunk=8", "method.hyper_start=2", "method.hyper_every=1",
        "online.start=1", "online.every=10", "online.fraction=1.0",
        "online.generate_batch_size=8", "online.batch_size=8", "online.max_new_tokens=6",
        "loop.steps=3", "loop.log_every=1", "loop.eval_every=0", "loop.progress=false"]
    checked = io.StringIO()
    with contextlib.redirect_stdout(checked):
        assert _llm.script("compile_check").main([
            "--config", str(path), *overrides, "--platform", "cpu", "--devices", "8",
            "--max-ratio", "10", "--compile-cache", str(tmp_path / "cache")]) == 0
    compiled = re.findall(r"\| cpu x8 data=1 fsdp=8 \| ([a-z ]+) \|", checked.getvalue())
    assert compiled == ["train", "offline train", "hyper", "generate", "log ratios",
                        "eval loss"], compiled
    cfg = config.load(experiment.ExperimentConfig, path, overrides)
    jax.clear_caches()  # as a new process: what it does not compile comes from the cache
    out = io.StringIO()
    experiment.run(cfg, tmp_path / "run", console=Console(stream=out))
    log = out.getvalue()
    for program in ("bds train step", "bds train step with generated rows",
                    "hypergradient step", "sampler", "validation loss pass", "test loss pass"):
        assert f"compiling the {program} ...\nloaded the {program} from the compilation " \
               "cache" in log, (program, log)
    assert "compiled the" not in log, log
    # the log's ratio pass runs at the end, over the refresh's rows: found in the cache too
    entries = _llm.cached_programs(tmp_path / "cache")
    assert entries.count("jit_row_ratios") == 1 and entries.count("jit__generate") == 1, entries


def _checked_into_cache(cfg, tmp_path) -> str:
    """compile_check.py --config (``cfg`` written to tmp_path/run.yaml) --compile-cache
    tmp_path/cache on the 8 CPU devices: what it printed."""
    import io

    config.dump(cfg, tmp_path / "run.yaml")
    checked = io.StringIO()
    with contextlib.redirect_stdout(checked):
        assert _llm.script("compile_check").main([
            "--config", str(tmp_path / "run.yaml"), "--platform", "cpu", "--devices", "8",
            "--compile-cache", str(tmp_path / "cache")]) == 0
    return checked.getvalue()


def test_compile_check_caches_every_step_of_an_online_run_with_length_buckets(
        tmp_path, model_dir, cache_state):
    """bds + online generation with data.length_buckets=3 and a sampled hypergradient: the
    generated rows' length buckets are fixed before the first refresh, so compile_check.py
    --compile-cache compiles the train step for each of them at each of the data's batch
    lengths, and the run's one hypergradient; the run, two refreshes later, has loaded every
    one of them from the cache and compiled none, its train steps drawing from the buckets
    the check named."""
    import io

    from jbilevel.console import Console

    cfg = _mixed_lengths(tmp_path, model_dir, "bds", hessian_rows=0, hyper_every=1,
                         hypergrad=Implicit("cg", maxiter=2, tol=0.0, ridge=100.0))
    cfg = dataclasses.replace(
        cfg, hyper_batch_size=16, loop=dataclasses.replace(cfg.loop, steps=4),
        online=online_lib.OnlineConfig(every=2, fraction=1.0, num_samples=2, batch_size=8,
                                       max_new_tokens=4, temperature=1.0))
    checked = _checked_into_cache(cfg, tmp_path)
    said = re.search(r"online: train steps draw the generated rows from (\d) length buckets, "
                     r"(.*) \(a train step", checked)
    spans = [b.split()[0] for b in said[2].split(", ")]
    assert int(said[1]) == len(spans) >= 2, checked
    widths = [int(s.split("-")[1]) for s in spans]
    compiled = re.findall(r"\| cpu x8 data=8 fsdp=1 \| ([a-z0-9 -]+) \|", checked)
    lengths = ["", *sorted({n.split()[1] for n in compiled if re.match(r"train \d+( |$)", n)})]
    assert len(lengths) >= 2  # the longest batch's, and the others'
    assert sorted(compiled[:len(lengths) * len(spans)]) == sorted(
        " ".join(["train", *([x] if x else []), *([s] if s != spans[-1] else [])])
        for x in lengths for s in spans), compiled
    assert compiled[len(lengths) * len(spans)] == "hyper", compiled
    jax.clear_caches()  # as a new process: what it does not compile comes from the cache
    out = io.StringIO()
    experiment.run(cfg, tmp_path / "run", console=Console(stream=out))
    log = out.getvalue()
    assert len(re.findall(r"online refresh at step \d+: ", log)) == 2, log
    assert "compiled the" not in log, log
    assert log.count("loaded the hypergradient step from the compilation cache") == 1
    programs = re.findall(r"compiling the bds train step with generated rows([^\n]*) \.\.\.\n"
                          r"loaded the", log)
    assert len(programs) >= 3, log
    for name in programs[1:]:
        assert int(re.search(r"generated rows of (\d+) tokens", name)[1]) in widths, name


def test_compile_check_caches_every_program_of_the_evaluation(tmp_path, model_dir,
                                                               cache_state):
    """A LoRA run that measures its validation loss along the way and scores its answers on
    both splits, with data.length_buckets=3: compile_check.py --compile-cache compiles the
    evaluation's loss pass at each length its validation and test batches take and a
    decoding program for each prompt width and answer budget the scored splits meet (the
    test answers longer than the validation's); the run loads every one of them from the
    cache and compiles none of them."""
    import io

    from jbilevel.console import Console

    def rows(ids, words, answer):
        return [{"question": f"Q{i}: " + "abc " * (i % 10) * words,
                 "response": answer(i), "answer": answer(i)} for i in ids]

    for split, part in (("train", rows(range(32), 3, str)),
                        ("val", rows(range(32, 48), 3, str)),
                        ("test", rows(range(48, 64), 2, lambda i: f"{i} is {i * 7}"))):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = _cfg(model_dir, "mix", inputs.ThetaConfig(kind="lora", rank=4, alpha=8.0))
    cfg = dataclasses.replace(
        cfg, loop=dataclasses.replace(cfg.loop, eval_every=1),
        data=inputs.DataConfig(train=str(tmp_path / "train.jsonl"),
                               validation=str(tmp_path / "val.jsonl"),
                               test=str(tmp_path / "test.jsonl"), max_len=160,
                               length_buckets=3, metric="answer", score_validation=True))
    checked = _checked_into_cache(cfg, tmp_path)
    compiled = re.findall(r"\| cpu x8 data=8 fsdp=1 \| ([a-z0-9 +]+) \|", checked)
    losses = [n for n in compiled if n.startswith("eval loss")]
    decodes = [n for n in compiled if n.startswith("evaluate")]
    assert len(losses) >= 2 and len(decodes) >= 3, compiled  # the test budget and val's
    cached = _llm.cached_programs(tmp_path / "cache")
    jax.clear_caches()  # as a new process: what it does not compile comes from the cache
    out = io.StringIO()
    experiment.run(cfg, tmp_path / "run", console=Console(stream=out))
    log = out.getvalue()
    for what in ("{} loss pass", "decoding of the {} answers"):
        said = re.findall(r"compiling the " + what.format("(validation|test)")
                          + r"[^\n]* \.\.\.\n(loaded|compiled) the", log)
        assert set(said) == {("validation", "loaded"), ("test", "loaded")}, (what, log)
    assert "compiled the" not in log, log
    # one program for each of the check's loss passes and decoding batches, and none added
    # by the run (every program compiled is cached here)
    after = _llm.cached_programs(tmp_path / "cache")
    for program, n in (("jit_pinned", len(losses)), ("jit__generate", len(decodes))):
        assert after.count(program) == cached.count(program) == n, (program, cached, after)


def test_file_task_uses_the_model_tokenizer_and_options(model_dir):
    data = inputs.DataConfig(train=str(DATA / "alpaca_cleaned.json"),
                             validation=str(DATA / "openorca.jsonl"), max_len=400)
    spec = experiment.ModelSpec(path=str(model_dir))
    with_bos = inputs.load_task(experiment.TaskConfig(), data, spec)
    assert with_bos.test is None and len(with_bos.train) == 3 and with_bos.good_N is None
    assert int(with_bos.train.sequence(0)[0]) == 1  # the model tokenizer's bos
    no_bos = inputs.load_task(experiment.TaskConfig(), inputs.DataConfig(
        train=data.train, validation=data.validation, max_len=400, add_bos=False), spec)
    np.testing.assert_array_equal(no_bos.train.sequence(0), with_bos.train.sequence(0)[1:])
    spec = experiment.ModelSpec(path=str(model_dir), compute_dtype="bfloat16", remat=True,
                                remat_policy="dots", attention="dot_product", scan_unroll=2)
    c = inputs.model_config(spec, with_bos.tokenizer, 400)
    assert (c.compute_dtype, c.remat, c.remat_policy, c.attention, c.scan_unroll,
            c.hidden_size) == ("bfloat16", True, "dots", "dot_product", 2, 32)


def test_load_pretrained_straight_into_shards(model_dir):
    from jbilevel import sharding as sh
    from jbilevel.models import build, read_config

    model = build(read_config(str(model_dir)))
    mesh = sh.make_mesh(sh.MeshConfig(data=1, fsdp=8, tensor=1))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    shardings = sh.tree_shardings(mesh, sh.AxisRules(), model.param_axes(), shapes)
    _, plain, _ = load_pretrained(str(model_dir))
    _, sharded, _ = load_pretrained(str(model_dir), shardings=shardings)
    assert sharded["layers"]["q"]["kernel"].sharding.spec[1] == "fsdp"
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _mixed_lengths(tmp_path, model_dir, method: str, **method_kw):
    rows = [{"question": f"Q{i}: " + "abc " * (i % 10) * 3, "response": str(i)} for i in range(40)]
    for split, part in (("train", rows[:32]), ("val", rows[32:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = _cfg(model_dir, method, inputs.ThetaConfig())
    return dataclasses.replace(
        cfg, method=dataclasses.replace(cfg.method, **method_kw),
        data=inputs.DataConfig(train=str(tmp_path / "train.jsonl"),
                               validation=str(tmp_path / "val.jsonl"), max_len=160,
                               length_buckets=3))


def test_length_buckets_train_on_batches_of_similar_length(tmp_path, model_dir, capsys):
    """data.length_buckets=3: rows of mixed lengths train in batches padded to three lengths,
    each of the step's programs compiled (and said) once, and eval --run scores the split as
    the run did. (That a stopped run resumes to the same batches: the Batcher's restore, in
    tests/test_data_batching.py, and the resume tests of whole runs.)"""
    import io

    from jbilevel.console import Console

    cfg = _mixed_lengths(tmp_path, model_dir, "bmo")
    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, steps=8))
    out = io.StringIO()
    first = experiment.run(cfg, tmp_path / "a", console=Console(stream=out))
    log = out.getvalue()
    lengths = re.findall(r"compiled the bmo train step for sequence length (\d+)", log)
    assert log.count("compiling the bmo train step ...") == 1 and len(lengths) == 2
    # the evaluation passes sort the split by length too, so eval --run scores it as the run did
    from jbilevel import cli

    capsys.readouterr()
    assert cli.main(["eval", "--run", str(tmp_path / "a")]) == 0
    said = capsys.readouterr()
    assert json.loads(said.out)["val_loss"] == first["val_loss"]
    assert "compiled the validation loss pass in" in said.err, said.err  # and said so


@pytest.mark.parametrize("hyper_batch_size", [0, 16])
def test_length_buckets_cut_the_bds_hypergradient_rows_to_their_length(tmp_path, model_dir,
                                                                        hyper_batch_size,
                                                                        cache_state):
    """bds with data.length_buckets, over every row (0) or a sample of 16 rows drawn a fixed
    number from each length bucket: one hypergradient program whose per-example term takes
    each length bucket's rows at that length, and whose weight step is taken. On the 8
    devices every block's rows are a multiple of 8: the 3 longest rows' block takes 5 of the
    next bucket's, and a sample of 16 rows takes 8 from each of two buckets (the 3 longest
    rows joined to the next 15). compile_check.py on the run's configuration compiles the
    very programs the run compiles: kept in a compilation cache, the sampled run loads them
    from it (the train step at each length, and the hypergradient cut the same way)."""
    import io

    from jbilevel.console import Console

    cfg = _mixed_lengths(tmp_path, model_dir, "bds", hessian_rows=0, hypergrad=Implicit(
        "cg", maxiter=2, tol=0.0, ridge=100.0))
    cfg = dataclasses.replace(cfg, hyper_batch_size=hyper_batch_size)
    config.dump(cfg, tmp_path / "run.yaml")
    checked = io.StringIO()
    if hyper_batch_size:  # (once: strata and their scales, the more involved cut)
        with contextlib.redirect_stdout(checked):
            assert _llm.script("compile_check").main([
                "--config", str(tmp_path / "run.yaml"), "--platform", "cpu", "--devices", "8",
                "--compile-cache", str(tmp_path / "cache")]) == 0
    out = io.StringIO()
    experiment.run(cfg, tmp_path / "run", console=Console(stream=out))
    log = out.getvalue()
    said = ("bds: the hypergradient's per-example term takes" if not hyper_batch_size
            else "bds: each hypergradient draws")
    groups = re.search(rf"{said} (.*)\n", log)[1].split(", ")
    assert [int(g.split()[0]) for g in groups] == ([8, 8] if hyper_batch_size else [8, 16, 8])
    assert log.count("compiling the hypergradient step") == 1
    if hyper_batch_size:
        assert f"cpu x8 data=8 fsdp=1: {said} {', '.join(groups)}\n" in checked.getvalue()
        assert "loaded the hypergradient step from the compilation cache" in log
        # the train step at each of the data's batch lengths, the longest first
        assert ("compiling the bds train step ...\nloaded the bds train step from the "
                "compilation cache") in log and "compiled the bds train step" not in log
        assert log.count("loaded the bds train step") == 2, log
    assert sum(int(g.split()[0]) for g in groups) == (hyper_batch_size or 32)
    metrics = [json.loads(r) for r in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("hyper_taken") for m in metrics if "hyper_step" in m] == [1.0]
    assert np.ptp(np.load(tmp_path / "run" / "weights.npy")) > 1e-5
