"""Online bds's step costs, side by side: what the buffer of generated rows adds to a step.

    PYTHONPATH=. python benchmarks/online_steps.py [--rounds 5 --steps 10] [key=value ...]
    # the default hyper batch of 512 rows (the fine-tuning config itself takes all N = 2000):
    PYTHONPATH=. python benchmarks/online_steps.py hyper_batch_size=512

Runs the trainer's own jitted, donated steps (``train.compile_steps`` of
``online.make_online_steps``) for configs/finetune/quality_online.yaml: the shipped base
fine-tuned on the quality task, its buffer (``online.fraction`` x N x ``num_samples`` rows)
filled by one refresh. Rows, timed in rounds that visit them in turn (the median is kept):

- ``offline step``: what the trainer runs before the first refresh (``train_offline``);
- ``step, empty buffer``: the step with generated rows on the still empty buffer (what
  earlier versions ran before the first refresh): the same objective; the ``online.batch_size``
  generated rows all weigh 0 (their ratio's forward is skipped, ``adjoint.if_any_valid``);
- ``step, full buffer``: the step with generated rows after a refresh;
- ``step, full buffer, no skip``: the same with the skip compiled out (what the branch costs
  where every row is valid);
- ``step, full buffer, one pass``: the step as earlier versions took it, one reverse pass over
  the offline and generated rows together (now one pass per group,
  ``adjoint.grouped_value_and_grad``);
- ``hyper, share of buffer``: the hypergradient as it runs now, over the hyper batch and the
  same share of the buffer (``online.hyper_buffer_rows``; all of it when the hyper batch is
  every training row);
- ``hyper, whole buffer``: over the hyper batch and the whole buffer, as earlier versions
  took it (compiled here with a rule that keeps every buffer row);
- ``hyper, empty buffer``: the hypergradient before the first refresh, as it runs now (the
  buffer's rows all invalid: every pass over them is skipped, ``adjoint.if_any_valid``);
- ``hyper, empty buffer, computed``: the same with the skip off, as earlier versions ran it
  (every buffer row through the model, then weighed 0);
- ``hyper, offline only``: bds's offline hypergradient over the hyper batch, the floor;
- ``hyper, share of buffer, no skip``: the first hyper row with the skip compiled out.

Benchmark on an idle machine (docs/design.md, Measuring).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from unittest import mock

import jax

from jbilevel import adjoint, experiment, inputs, train
from jbilevel import config as config_lib
from jbilevel import sharding as sh
from jbilevel.algorithms import online as ol
from jbilevel.algorithms import refresh
from jbilevel.algorithms.offline import make_steps
from jbilevel.console import QUIET, Console
from jbilevel.models import build
from jbilevel.xla_options import tune_host_malloc


def main():
    tune_host_malloc()  # as the jbilevel command does (jbilevel/xla_options.py)
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/finetune/quality_online.yaml")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="train steps timed per round")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. hyper_batch_size=512")
    a = p.parse_args()

    cfg = config_lib.load(experiment.ExperimentConfig, a.config, a.overrides)
    with tempfile.TemporaryDirectory() as tmp:  # the task's splits, as a run writes them
        cfg = experiment.resolve(cfg, tmp, write=True)
        task = experiment.load_data(cfg, Console(QUIET))
    data_set = task.train
    n = len(data_set)
    positions = max(data_set.max_len, int(data_set.prompt_len_N.max()) + (
        cfg.online.max_new_tokens or int((data_set.length_N - data_set.prompt_len_N).max())))
    model = build(inputs.model_config(cfg.model, task.tokenizer, positions))
    mesh, rules = sh.make_mesh(cfg.mesh), sh.AxisRules()
    refresher = refresh.Refresher(cfg.online, model, data_set, weighting=cfg.method.weighting,
                                  batch_sharding=sh.batch_sharding(mesh, rules, 1),
                                  seed=cfg.seed)
    init, init_args, state_sh, example_loss = experiment.state_setup(
        cfg, model, n, mesh, rules, load_weights=True)
    def fresh(*args):  # as experiment.run builds an online run's state
        return init(*args).replace(online=refresher.init_buffer())

    state_sh = state_sh.replace(online=ol.buffer_shardings(
        mesh, rules, jax.eval_shape(fresh, *init_args).online))
    state = jax.jit(fresh, out_shardings=state_sh)(*init_args)
    steps = ol.make_online_steps(example_loss, model, cfg.method, cfg.online, seed=cfg.seed)
    compiled = train.compile_steps(steps, cfg.method, mesh, rules, state_sh)
    with mock.patch.object(ol, "hyper_buffer_rows", lambda capacity, *_: capacity):
        whole = train.compile_steps(ol.make_online_steps(example_loss, model, cfg.method,
                                                         cfg.online, seed=cfg.seed),
                                    cfg.method, mesh, rules, state_sh)
        # traced (and compiled) inside the patch: jit traces on first use
        put = lambda b: jax.device_put(b, compiled.batch_sharding)  # noqa: E731
        hyper_rows = min(cfg.hyper_batch_size or n, n)
        hyper_b = put(next(experiment._process_batcher(data_set, hyper_rows, mesh, rules,
                                                       seed=2, shuffle=True)))
        val_b = put(next(experiment._process_batcher(task.validation, cfg.val_batch_size,
                                                     mesh, rules, seed=1)))
        data = experiment._process_batcher(data_set, cfg.batch_size, mesh, rules, seed=0)
        batches = [put(next(data)) for _ in range(a.steps)]
        empty = state
        state, _ = refresher(jax.tree.map(lambda x: x.copy(), state), cfg.online.start)
        whole_hyper = whole.hyper.lower(state, hyper_b, val_b).compile()
    with contextlib.ExitStack() as stack:  # every pass over buffer rows run, valid or not
        for module in (ol, adjoint):
            stack.enter_context(mock.patch.object(module, "if_any_valid",
                                                  lambda _valid, fn, *args, **_: fn(*args)))
        computed = train.compile_steps(ol.make_online_steps(example_loss, model, cfg.method,
                                                            cfg.online, seed=cfg.seed),
                                       cfg.method, mesh, rules, state_sh)
        computed_hyper = computed.hyper.lower(empty, hyper_b, val_b).compile()
        computed_train = computed.train.lower(state, batches[0]).compile()
    # the train step as earlier versions took it: one reverse pass over both groups' rows
    with mock.patch.object(ol, "RowGroups", lambda groups: ol.combine(
            groups[0][1], groups[1][1], cfg.online.gen_weight)):
        one_pass = train.compile_steps(ol.make_online_steps(example_loss, model, cfg.method,
                                                            cfg.online, seed=cfg.seed),
                                       cfg.method, mesh, rules, state_sh)
        one_pass_train = one_pass.train.lower(state, batches[0]).compile()
    offline = train.compile_steps(make_steps(example_loss, cfg.method), cfg.method, mesh,
                                  rules, state_sh)
    capacity = refresher.capacity
    share = ol.hyper_buffer_rows(capacity, hyper_rows, n, sh.data_parallel_size(mesh, rules))
    runners = {  # name -> (step, state it starts from, batch list or the hyper batch)
        "offline step": (compiled.train_offline, empty, batches),
        "step, empty buffer": (compiled.train, empty, batches),
        "step, full buffer": (compiled.train, state, batches),
        "step, full buffer, no skip": (computed_train, state, batches),
        "step, full buffer, one pass": (one_pass_train, state, batches),
        f"hyper, share of buffer ({share} rows)": (compiled.hyper, state, None),
        f"hyper, whole buffer ({capacity} rows)": (whole_hyper, state, None),
        "hyper, empty buffer": (compiled.hyper, empty, None),
        "hyper, empty buffer, computed": (computed_hyper, empty, None),
        "hyper, offline only": (offline.hyper, empty, None),
        "hyper, share of buffer, no skip": (computed_hyper, state, None),
    }
    states = {}
    t_setup = time.perf_counter()

    def run(name):
        step, start, bb = runners[name]
        s = states[name] if name in states else jax.tree.map(lambda x: x.copy(), start)
        if bb is None:
            s, metrics = step(s, hyper_b, val_b)
        else:
            for b in bb:
                s, metrics = step(s, b)
        jax.block_until_ready(metrics)
        states[name] = s

    for name in runners:  # compile and warm up
        run(name)
    print(f"set up in {time.perf_counter() - t_setup:.0f} s; timing", flush=True)
    times = {name: [] for name in runners}
    for _ in range(a.rounds):
        for name, (_, _, bb) in runners.items():
            t = time.perf_counter()
            run(name)
            times[name].append((time.perf_counter() - t) / (len(bb) if bb else 1))
    secs = {name: statistics.median(v) for name, v in times.items()}
    print(f"{a.config}: N={n}, B={cfg.batch_size} offline + {cfg.online.batch_size} generated "
          f"rows a step, buffer {capacity} rows, hyper batch {hyper_rows} rows, Hessian on "
          f"{cfg.method.hessian_rows or hyper_rows} (+ as many generated), devices={mesh.size} "
          f"({jax.default_backend()})")
    print(f"{'step':<36}{'s':>9}{'ratio':>8}")
    base = secs["offline step"]
    hyper_base = next(v for k, v in secs.items() if k.startswith("hyper, share"))
    for name, s in secs.items():
        ref = hyper_base if name.startswith("hyper") else base
        print(f"{name:<36}{s:>9.4f}{s / ref:>8.2f}")


if __name__ == "__main__":
    main()
