"""Trainer step cost, side by side: sft, mix, bmo and bds (with its hypergradient schedule).

    PYTHONPATH=. python benchmarks/trainer.py [--rounds 5 --steps 10 --unchunked] [key=value ...]
    # bds at the shipped hypergradient defaults (the config itself takes all N = 4000 rows):
    PYTHONPATH=. python benchmarks/trainer.py hyper_batch_size=512 method.hessian_rows=64 \
        method.hyper_chunk=32

Every method runs the trainer's own jitted, donated step (``train.compile_steps``) with the
tiny LM and task of configs/quality_bds.yaml, on the same training token batches (bmo also
reads a validation batch each step, as the paper's code does). Rounds visit the methods in
turn and the median round is kept, so load from other processes hits all methods alike.

Reported per method: steps/s, seconds per step, the ratio to sft, and compiled memory
(``memory_analysis()``: temp = activations and scratch, args = state + batches) vs sft.
bds end to end = one weighted step + one hypergradient (Hessian on ``hessian_rows`` rows,
per-example term over all N examples, ``hyper_chunk`` rows at a time) every ``hyper_every``
steps, every one taken (the ``hyper_max_val_loss`` gate is off here; in a run it skips the
steps before the model has learned the task, so the run costs less). ``mix@B+Bv`` trains on
batches of B + Bv rows: the same tokens a bmo step reads, the fair denominator for bmo.
``--unchunked`` also compiles (never runs) the unchunked hypergradient over all N examples to
report the memory it would need. Benchmark on an idle machine (docs/design.md, Measuring).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time

import jax

from jbilevel import config as config_lib
from jbilevel import sharding as sh
from jbilevel import train
from jbilevel.algorithms import init_state, make_steps
from jbilevel.data import Batcher, make_task
from jbilevel.experiment import ExperimentConfig, longest_bucket
from jbilevel.models import ModelConfig, build
from jbilevel.objectives import lm_example_loss
from jbilevel.xla_options import tune_host_malloc

MiB = 2**20


def _setup(exp: ExperimentConfig, method: str, n: int, model, mesh, rules, **method_kw):
    if method == "bds":  # time the hypergradient itself: the untrained model's validation loss
        method_kw.setdefault("hyper_max_val_loss", 0.0)  # is above any gate, which would skip it
    cfg = dataclasses.replace(exp.method, method=method, **method_kw)

    def init():
        return init_state(model.init(jax.random.key(0)), n, cfg)

    state_sh = train.state_shardings(mesh, rules, jax.eval_shape(init), model.param_axes(), cfg)
    compiled = train.compile_steps(make_steps(lm_example_loss(model), cfg), cfg, mesh,
                                   rules, state_sh)
    return cfg, compiled, jax.jit(init, out_shardings=state_sh)()


def _compile(jitted, *args):
    """The executable (compiled once, ahead of time) and its (temp MiB, argument MiB)."""
    executable = jitted.lower(*args).compile()
    mem = executable.memory_analysis()
    if mem is None:
        return executable, (float("nan"), float("nan"))
    return executable, (mem.temp_size_in_bytes / MiB, mem.argument_size_in_bytes / MiB)


def main():
    tune_host_malloc()  # as the jbilevel command does (jbilevel/xla_options.py)
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/quality_bds.yaml")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="train steps timed per round")
    p.add_argument("--unchunked", action="store_true",
                   help="also compile the unchunked all-N hypergradient for its memory")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. method.hyper_chunk=1000")
    a = p.parse_args()

    exp = config_lib.load(ExperimentConfig, a.config, a.overrides)
    task = make_task(exp.task.name, seed=exp.task.seed, **exp.task.options)
    data_set = task.train
    n = len(data_set)
    spec = exp.model
    model = build(ModelConfig(
        family=spec.family, vocab_size=task.tokenizer.vocab_size, hidden_size=spec.hidden_size,
        num_layers=spec.num_layers, num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=data_set.max_len,
        eos_token_id=task.tokenizer.eos_id, pad_token_id=task.tokenizer.pad_id,
        bos_token_id=task.tokenizer.bos_id))
    mesh, rules = sh.make_mesh(exp.mesh), sh.AxisRules()
    bs, vbs = exp.batch_size, exp.val_batch_size

    def batches(dataset, size, seed, count):  # padded as the trainer pads them
        it = Batcher(dataset, size, seed=seed, buckets=(longest_bucket(dataset),))
        return [next(it) for _ in range(count)]

    k = a.steps
    train_b = batches(data_set, bs, 0, k)
    wide_b = batches(data_set, bs + vbs, 0, k)  # mix@B+Bv: as many rows as bmo reads
    val_b = batches(task.validation, vbs, 1, k)
    # bds's hyper batch as the trainer feeds it: all N (or hyper_batch_size) rows, shuffled.
    hyper_rows = min(exp.hyper_batch_size or n, n)
    hyper_b = batches(data_set, hyper_rows, 2, 1)[0]

    methods = {  # name -> (method, per-step batches, with validation batch)
        "sft": ("sft", train_b, False), "mix": ("mix", train_b, False),
        f"mix@B+Bv={bs + vbs}": ("mix", wide_b, False), "bmo": ("bmo", train_b, True),
        "bds": ("bds", train_b, False)}
    runners, memory = {}, {}
    t_setup = time.perf_counter()
    for name, (method, bb, with_val) in methods.items():
        print(f"compiling {name} ({time.perf_counter() - t_setup:.0f} s)", flush=True)
        cfg, compiled, state = _setup(exp, method, n, model, mesh, rules)
        put = lambda b, c=compiled: jax.device_put(b, c.batch_sharding)
        dev_b = [put(b) for b in bb]
        dev_v = [put(v) for v in val_b] if with_val else None
        step, memory[name] = _compile(compiled.train, state, *([dev_b[0], dev_v[0]]
                                                               if with_val else [dev_b[0]]))
        runners[name] = {"train": step, "state": state, "b": dev_b, "v": dev_v}
        if method == "bds":
            runners[name]["h"] = (put(hyper_b), put(val_b[0]))
            runners[name]["hyper"], memory["bds hyper step"] = _compile(
                compiled.hyper, state, *runners[name]["h"])
            hyper_cfg = cfg
    if a.unchunked:
        cfg, compiled, state = _setup(exp, "bds", n, model, mesh, rules, hyper_chunk=0,
                                      hessian_rows=0)
        put = lambda b: jax.device_put(b, compiled.batch_sharding)
        _, memory["bds hyper, unchunked (compiled only)"] = _compile(
            compiled.hyper, state, put(hyper_b), put(val_b[0]))
        del state

    def run_train(r):
        state = r["state"]
        for i in range(k):
            args = (r["b"][i], r["v"][i]) if r["v"] is not None else (r["b"][i],)
            state, metrics = r["train"](state, *args)
        jax.block_until_ready(metrics)
        r["state"] = state

    def run_hyper(r):
        state, metrics = r["hyper"](r["state"], *r["h"])
        jax.block_until_ready(metrics)
        r["state"] = state

    for r in runners.values():  # compile and warm up
        run_train(r)
    run_hyper(runners["bds"])
    print(f"set up in {time.perf_counter() - t_setup:.0f} s; timing", flush=True)
    times = {name: [] for name in runners}
    hyper_times = []
    for _ in range(a.rounds):
        for name, r in runners.items():
            t = time.perf_counter()
            run_train(r)
            times[name].append((time.perf_counter() - t) / k)
        t = time.perf_counter()
        run_hyper(runners["bds"])
        hyper_times.append(time.perf_counter() - t)
    step_s = {name: statistics.median(v) for name, v in times.items()}
    hyper_s = statistics.median(hyper_times)
    every = hyper_cfg.hyper_every
    step_s["bds end to end"] = step_s["bds"] + hyper_s / every

    n_params = sum(x.size for x in jax.tree.leaves(runners["sft"]["state"].theta))
    print(f"quality task tiny LM ({a.config}): {n_params / 1e6:.2f}M params, "
          f"d={spec.hidden_size}, layers={spec.num_layers}, seq={longest_bucket(data_set)}, "
          f"B={bs}, Bv={vbs}, N={n}, devices={mesh.size} ({jax.default_backend()})")
    print(f"bds hypergradient: every {every} steps, Hessian on {hyper_cfg.hessian_rows or n} "
          f"rows, per-example term over {hyper_rows} rows in chunks of {hyper_cfg.hyper_chunk}, "
          f"{hyper_cfg.hypergrad.maxiter} CG; one hyper step {hyper_s:.3f} s")
    print(f"{'method':<26}{'steps/s':>9}{'s/step':>9}{'x sft':>7}{'temp MiB':>10}"
          f"{'args MiB':>10}{'x sft mem':>11}")
    t0, (m0, a0) = step_s["sft"], memory["sft"]
    for name, s in step_s.items():
        temp, args = memory.get(name, memory["bds"] if name == "bds end to end" else None)
        if name == "bds end to end":  # its peak is the larger of the two executables
            temp = max(temp, memory["bds hyper step"][0])
        print(f"{name:<26}{1 / s:>9.2f}{s:>9.4f}{s / t0:>7.2f}{temp:>10.1f}{args:>10.1f}"
              f"{(temp + args) / (m0 + a0):>11.2f}")
    for name in ("bds hyper step", "bds hyper, unchunked (compiled only)"):
        if name in memory:
            temp, args = memory[name]
            print(f"{name:<26}{'':>25}{temp:>10.1f}{args:>10.1f}"
                  f"{(temp + args) / (m0 + a0):>11.2f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process max RSS {rss:.0f} MiB (all of the above in one process)")
    bmo_wide = step_s["bmo"] / step_s[f"mix@B+Bv={bs + vbs}"]
    print(f"\nbmo step / mix step, same tokens (mix@{bs + vbs}): {bmo_wide:.2f} (target <= 1.15: "
          f"{'PASS' if bmo_wide <= 1.15 else 'FAIL'}); vs mix@{bs}: "
          f"{step_s['bmo'] / step_s['mix']:.2f} (bmo also reads {vbs} validation rows)")
    e2e = step_s["bds end to end"] / t0
    print(f"bds end to end / sft: {e2e:.2f} (target <= 1.3: {'PASS' if e2e <= 1.3 else 'FAIL'})")


if __name__ == "__main__":
    main()
