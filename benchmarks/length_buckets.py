"""Padding cost of one sequence length against `data.length_buckets`, side by side.

    PYTHONPATH=. python benchmarks/length_buckets.py [--rounds 3 --buckets 1 2 4 --rows 2048]
    PYTHONPATH=. python benchmarks/length_buckets.py --bds   # bds's hypergradient step instead
    PYTHONPATH=. python benchmarks/length_buckets.py --bds --hyper-batch 512   # a sample
    PYTHONPATH=. python benchmarks/length_buckets.py --online   # an online refresh instead
    PYTHONPATH=. python benchmarks/length_buckets.py --online-steps   # online train steps
    PYTHONPATH=. python benchmarks/length_buckets.py --online-hyper --hyper-batch 512   # bds's

SFT data mixes short and long examples (Alpaca: most rows a few hundred tokens, a tail up to
max_len). With one bucket every batch is padded to the longest sequence; with n buckets each
epoch groups rows by length and pads each batch to the smallest of n lengths that holds it
(``jbilevel.data.batching``). Here: ``--rows`` examples whose lengths are log-normal (median
160 tokens, a tail cut at 512), the trainer's own jitted sft step (``train.compile_steps``) on
a small Llama, batch 16. Every bucket's program is compiled before timing; rounds visit the
settings in turn and keep each one's median epoch, so load from other processes hits them
alike. Reported: padded tokens per epoch (and the share that is padding), the epoch's
seconds, and both as ratios to one bucket.

``--bds``: the trainer's bds hypergradient step over every row (Hessian on 64 of them, 2 CG
iterations, the per-example term 32 rows at a time), the rows sorted by length and each
bucket's rows cut to its length (``offline_hyper_rows(blocks=)``), against all of them at the
longest length; seconds per hypergradient step. With ``--hyper-batch M`` the step takes a
sample of M rows, as the LLM configs' ``hyper_batch_size``: with several buckets a fixed number
from each (``length_strata``), cut to its length, against M rows drawn at random at the longest
length; the median over ``--rounds`` rounds of 3 batches each. ``--memory``: instead of
timing, each setting's compiled temporaries (the cut step's groups run one after another, so
it should need no more memory than the uncut one).

``--online``: one online refresh (``jbilevel.algorithms.refresh.Refresher``): ``--fraction`` of
the questions, 2 samples each, ``--new-tokens`` sampled tokens a response (a model at its
initialisation rarely ends early, so every call decodes its budget), 32 prompts a sampler call;
with several buckets the questions sampled longest prompt first and each call's prompts padded
to their bucket, against every call padded to the longest prompt. The median seconds of
``--rounds`` refreshes (each first run once, so every call's program is compiled before
timing), and the prompt tokens (rows x padded length) its sampler calls took on average.

``--online-steps``: the trainer's online bmo train step, which trains on an offline batch and
on ``--gen-batch`` rows drawn from the buffer of generated pairs: at the buffer's one width
(longest prompt + ``--new-tokens``), against drawn from one of n length buckets of the
buffer's rows and cut to its width (``Refresher.train_args``). The buffer holds one refresh
of ``--fraction`` of the questions, 2 samples each, each sample cut to its question's
response length in the data (a fine-tuned model ends its answers; the random one here draws
its end token among 100 characters, and about half of its samples end sooner: the responses
are at most as long as the data's). The offline batches are
the same for every setting (rows of about the median length), so the difference is the
generated rows'. The
median seconds of ``--steps`` steps over ``--rounds`` rounds (every program compiled first)
and the generated tokens a step (rows x width) on average.

``--online-hyper``: the trainer's online bds hypergradient step (Hessian on 64 offline and 64
generated rows, 2 CG iterations, 32 rows a pass) over ``--hyper-batch`` offline rows of about
the median length (the same for every setting; 0: every row) and the same share of that
buffer's rows (``hyper_buffer_rows``): at the buffer's width, against a share from each length
bucket cut to its width (``Refresher.hyper_args``). The median seconds of 3 steps in each of
``--rounds`` rounds, and the generated tokens a step takes (rows x width); ``--memory``: the
compiled step's temporaries instead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from jbilevel import sharding as sh
from jbilevel import train
from jbilevel.algorithms import MethodConfig, init_state, make_steps
from jbilevel.algorithms.offline import offline_hyper_rows
from jbilevel.algorithms.online import OnlineConfig
from jbilevel.algorithms.refresh import Refresher
from jbilevel.data import Batcher, load_sft
from jbilevel.data.batching import length_blocks, length_buckets, length_strata
from jbilevel.implicit import Implicit
from jbilevel.models import ModelConfig, build
from jbilevel.objectives import lm_example_loss

MAX_LEN = 512


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    total = np.clip(rng.lognormal(np.log(160), 0.6, n).astype(int), 24, MAX_LEN - 2)
    prompt = (total * rng.uniform(0.3, 0.7, n)).astype(int)
    return [{"question": "q" * int(p), "response": "r" * int(t - p)}
            for p, t in zip(prompt, total, strict=True)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bds", action="store_true", help="time the hypergradient step instead")
    ap.add_argument("--hyper-batch", type=int, default=0,
                    help="--bds: rows per hypergradient (0: every row)")
    ap.add_argument("--memory", action="store_true",
                    help="--bds: print the compiled step's temporaries instead of timing it")
    ap.add_argument("--online", action="store_true", help="time an online refresh instead")
    ap.add_argument("--fraction", type=float, default=0.25,
                    help="--online: share of the questions refreshed")
    ap.add_argument("--new-tokens", type=int, default=64,
                    help="--online: sampled tokens per response")
    ap.add_argument("--online-steps", action="store_true",
                    help="time online train steps on a refreshed buffer instead")
    ap.add_argument("--gen-batch", type=int, default=16,
                    help="--online-steps: generated rows per train step")
    ap.add_argument("--online-hyper", action="store_true",
                    help="time online bds hypergradient steps on a refreshed buffer instead")
    ap.add_argument("--steps", type=int, default=32,
                    help="--online-steps: train steps per round and setting")
    args = ap.parse_args()
    ds = load_sft(_rows(args.rows), prompt_template="{question}", max_len=MAX_LEN)
    model = build(ModelConfig(vocab_size=ds.tokenizer.vocab_size, hidden_size=128,
                              num_layers=2, num_heads=4, intermediate_size=256,
                              max_position_embeddings=MAX_LEN))
    cfg = MethodConfig(method="sft", lr_theta=1e-3)
    mesh = sh.make_mesh(sh.MeshConfig(data=1), jax.devices()[:1])
    rules = sh.AxisRules()
    if args.bds:
        return _bds(args, ds, model, mesh, rules)
    if args.online:
        return _online(args, ds, model, mesh, rules)
    if args.online_steps:
        return _online_steps(args, ds, model, mesh, rules)
    if args.online_hyper:
        return _online_hyper(args, ds, model, mesh, rules)

    def init():
        return init_state(model.init(jax.random.key(0)), len(ds), cfg)

    state_sh = train.state_shardings(mesh, rules, jax.eval_shape(init), model.param_axes(), cfg)
    compiled = train.compile_steps(make_steps(lm_example_loss(model), cfg), cfg, mesh, rules,
                                   state_sh)
    state = jax.jit(init, out_shardings=state_sh)()
    lengths = ds.length_N
    print(f"{len(ds)} rows, lengths: median {int(np.median(lengths))}, p90 "
          f"{int(np.percentile(lengths, 90))}, max {int(lengths.max())}; batch "
          f"{args.batch_size}; {jax.devices()[0].platform}", flush=True)

    def batches(n):
        return list(Batcher(ds, args.batch_size, seed=0, buckets=length_buckets(lengths, n),
                            group_by_length=n > 1).epoch_batches())

    epochs = {n: [jax.device_put(b, compiled.batch_sharding) for b in batches(n)]
              for n in args.buckets}
    for epoch in epochs.values():  # compile every shape first
        for length in sorted({b["input_ids"].shape[1] for b in epoch}):
            batch = next(b for b in epoch if b["input_ids"].shape[1] == length)
            state, _ = compiled.train(state, batch)
    jax.block_until_ready(state)
    seconds: dict[int, list[float]] = {n: [] for n in args.buckets}
    for _ in range(args.rounds):
        for n, epoch in epochs.items():
            t0 = time.perf_counter()
            for batch in epoch:
                state, _ = compiled.train(state, batch)
            jax.block_until_ready(state)
            seconds[n].append(time.perf_counter() - t0)
    real = int(lengths.sum())
    base_tokens = sum(b["input_ids"].size for b in epochs[args.buckets[0]])
    base_s = statistics.median(seconds[args.buckets[0]])
    print("| length_buckets | lengths | padded tokens / epoch | padding share | epoch s | "
          f"tokens vs {args.buckets[0]} | time vs {args.buckets[0]} |")
    print("|---|---|---|---|---|---|---|")
    for n, epoch in epochs.items():
        tokens = sum(b["input_ids"].size for b in epoch)
        s = statistics.median(seconds[n])
        shapes = sorted({b["input_ids"].shape[1] for b in epoch})
        print(f"| {n} | {', '.join(map(str, shapes))} | {tokens} | {1 - real / tokens:.2f} | "
              f"{s:.2f} | {tokens / base_tokens:.2f} | {s / base_s:.2f} |")


def _bds(args, ds, model, mesh, rules):
    cfg = MethodConfig(method="bds", hessian_rows=64, hyper_chunk=32, lr_omega=0.1,
                       hypergrad=Implicit("cg", maxiter=2, tol=0.0, ridge=100.0))
    lengths, n = ds.length_N, len(ds)
    state = init_state(model.init(jax.random.key(0)), n, cfg)
    val = ds.batch(np.arange(32), MAX_LEN)
    loss = lm_example_loss(model)
    m = args.hyper_batch or n
    print(f"{n} rows, lengths: median {int(np.median(lengths))}, p90 "
          f"{int(np.percentile(lengths, 90))}, max {int(lengths.max())}; bds hypergradient "
          f"over {'every row' if m >= n else f'{m} rows'}; {jax.devices()[0].platform}",
          flush=True)
    runs = {}
    for b in args.buckets:
        buckets = length_buckets(lengths, b)
        if m >= n:
            blocks = length_blocks(lengths, n, buckets) if b > 1 else None
            batcher = Batcher(ds, n, seed=0, buckets=buckets[-1:], sort_by_length=b > 1)
        else:
            blocks = length_strata(lengths, m, buckets) if b > 1 else None
            batcher = Batcher(ds, m, seed=0, buckets=buckets[-1:], strata=blocks)
        batches = [next(batcher) for _ in range(1 if m >= n else 3)]
        hyper = jax.jit(make_steps(loss, cfg, hyper_rows=offline_hyper_rows(cfg, blocks)).hyper)
        if args.memory:
            temp = hyper.lower(state, batches[0], val).compile().memory_analysis()
            print(f"length_buckets {b}: temporaries {temp.temp_size_in_bytes / 2**20:.1f} MiB",
                  flush=True)
            continue
        jax.block_until_ready(hyper(state, batches[0], val))  # compile
        runs[b] = (hyper, batches, blocks)
    if args.memory:
        return
    seconds: dict[int, list[float]] = {b: [] for b in args.buckets}
    for _ in range(args.rounds):
        for b, (hyper, batches, _) in runs.items():
            for batch in batches:
                t0 = time.perf_counter()
                jax.block_until_ready(hyper(state, batch, val))
                seconds[b].append(time.perf_counter() - t0)
    base = statistics.median(seconds[args.buckets[0]])
    print(f"| length_buckets | per-example rows at lengths | hyper step s | time vs "
          f"{args.buckets[0]} |")
    print("|---|---|---|---|")
    for b, (_, batches, blocks) in runs.items():
        cut = (", ".join(f"{e - s} at {L}" for s, e, L in blocks) if blocks
               else f"{m} at {batches[0]['input_ids'].shape[1]}")
        s = statistics.median(seconds[b])
        print(f"| {b} | {cut} | {s:.2f} | {s / base:.2f} |")


def _online(args, ds, model, mesh, rules):
    import jbilevel.models

    cfg = OnlineConfig(every=1, fraction=args.fraction, num_samples=2, batch_size=8,
                       max_new_tokens=args.new_tokens, generate_batch_size=32)
    state = init_state(model.init(jax.random.key(0)), len(ds), MethodConfig(method="bmo"))
    prompt_N = ds.prompt_len_N
    print(f"{len(ds)} rows, prompt lengths: median {int(np.median(prompt_N))}, p90 "
          f"{int(np.percentile(prompt_N, 90))}, max {int(prompt_N.max())}; refresh of "
          f"{args.fraction} of the questions, 2 samples, {args.new_tokens} new tokens, 32 "
          f"prompts a call; {jax.devices()[0].platform}", flush=True)
    padded, real = [], jbilevel.models.generate

    def counting(model, params, ids, mask, rng, **kw):  # the prompt tokens each call pads to
        padded.append(ids.size)
        return real(model, params, ids, mask, rng, **kw)

    jbilevel.models.generate = counting
    runs = {}
    for b in args.buckets:
        ref = Refresher(cfg, model, ds, weighting="sigmoid", rules=rules, buckets=b,
                        batch_sharding=sh.batch_sharding(mesh, rules, 1))
        runs[b] = (ref, state.replace(online=ref.init_buffer()))
        for step in range(args.rounds):  # every call's program compiled before timing
            jax.block_until_ready(ref(runs[b][1], step))
    seconds: dict[int, list[float]] = {b: [] for b in args.buckets}
    tokens: dict[int, int] = {}
    for step in range(args.rounds):  # the same refreshes again, each setting in turn
        for b, (ref, start) in runs.items():
            padded.clear()
            t0 = time.perf_counter()
            jax.block_until_ready(ref(start, step))
            seconds[b].append(time.perf_counter() - t0)
            tokens[b] = tokens.get(b, 0) + sum(padded)
    base = statistics.median(seconds[args.buckets[0]])
    print(f"| length_buckets | prompt lengths | padded prompt tokens a refresh | refresh s | "
          f"time vs {args.buckets[0]} |")
    print("|---|---|---|---|---|")
    for b, (ref, _) in runs.items():
        s = statistics.median(seconds[b])
        print(f"| {b} | {', '.join(map(str, ref.prompt_lengths))} | "
              f"{tokens[b] // args.rounds} | {s:.2f} | {s / base:.2f} |")


def _cut_to_data_lengths(buffer, ds):
    """The buffer's samples cut to their question's response length in the data (+ eos)."""
    host = jax.device_get(buffer)
    keep_R = ds.prompt_len_N[host.ids] + np.minimum(
        ds.length_N[host.ids] - ds.prompt_len_N[host.ids],
        host.attention_mask.sum(axis=1) - ds.prompt_len_N[host.ids])
    inside = np.arange(host.input_ids.shape[1])[None, :] < keep_R[:, None]
    labelled = np.arange(host.input_ids.shape[1])[None, :] < keep_R[:, None] - 1
    cut = host.replace(
        input_ids=np.where(inside, host.input_ids, ds.pad_id),
        attention_mask=host.attention_mask * inside,
        labels=np.where(labelled, host.labels, ds.pad_id),
        loss_mask=host.loss_mask * labelled, logp=host.logp * labelled)
    return jax.device_put(cut, jax.tree.map(lambda x: x.sharding, buffer))


def _online_config(args) -> OnlineConfig:
    return OnlineConfig(every=1, fraction=args.fraction, num_samples=2,
                        batch_size=args.gen_batch, max_new_tokens=args.new_tokens,
                        generate_batch_size=32)


def _refreshed(cfg, method, steps, ds, model, mesh, rules, buckets: int):
    """A refresher of ``buckets`` lengths, the compiled ``steps`` and a state whose buffer
    holds one refresh, each sample cut to its question's response length in the data."""
    from jbilevel.algorithms import online as ol

    ref = Refresher(cfg, model, ds, weighting="sigmoid", rules=rules, buckets=buckets,
                    batch_sharding=sh.batch_sharding(mesh, rules, 1))

    def init():
        return init_state(model.init(jax.random.key(0)), len(ds), method).replace(
            online=ref.init_buffer())

    shapes = jax.eval_shape(init)
    state_sh = train.state_shardings(mesh, rules, shapes, model.param_axes(), method).replace(
        online=ol.buffer_shardings(mesh, rules, shapes.online))
    compiled = train.compile_steps(steps, method, mesh, rules, state_sh)
    state, _ = ref(jax.jit(init, out_shardings=state_sh)(), 0)
    state = state.replace(online=_cut_to_data_lengths(state.online, ds))
    ref.spans = None  # the buckets of the cut rows
    return ref, compiled, state


def _online_steps(args, ds, model, mesh, rules):
    from jbilevel.algorithms import online as ol

    cfg = _online_config(args)
    method = MethodConfig(method="bmo", lr_theta=1e-3)
    loss = lm_example_loss(model)
    steps = ol.make_online_steps(loss, model, method, cfg)
    # the offline batch: rows about the median length, padded to a multiple of 64
    middle = np.argsort(ds.length_N)[len(ds) // 2:][:args.batch_size]
    offline = ds.batch(middle, -(-int(ds.length_N[middle].max()) // 64) * 64)
    print(f"{len(ds)} rows; online bmo train steps: an offline batch of {args.batch_size} rows "
          f"at {offline['input_ids'].shape[1]} tokens and {args.gen_batch} generated rows "
          f"drawn from a refresh of {args.fraction} of the questions (2 samples, at most "
          f"{args.new_tokens} new tokens, cut to the data's response lengths); "
          f"{jax.devices()[0].platform}", flush=True)
    runs = {}
    for b in args.buckets:
        ref, compiled, state = _refreshed(cfg, method, steps, ds, model, mesh, rules, b)
        batch = jax.device_put(offline, compiled.batch_sharding)
        plan = [ref.train_args(state, step) for step in range(args.steps)]
        for static in sorted(set(plan), key=str):  # every program compiled before timing
            state, _ = compiled.train(state, batch, batch, *static)
        runs[b] = (compiled, jax.block_until_ready(state), batch, plan, ref)
    seconds: dict[int, list[float]] = {b: [] for b in args.buckets}
    for _ in range(args.rounds):
        for b, (compiled, state, batch, plan, ref) in runs.items():
            t0 = time.perf_counter()
            for static in plan:
                state, _ = compiled.train(state, batch, batch, *static)
            runs[b] = (compiled, jax.block_until_ready(state), batch, plan, ref)
            seconds[b].append((time.perf_counter() - t0) / len(plan))
    base = statistics.median(seconds[args.buckets[0]])
    print(f"| length_buckets | generated rows: buckets (rows) | generated tokens a step | "
          f"step s | time vs {args.buckets[0]} |")
    print("|---|---|---|---|---|")
    for b, (_, state, _, plan, ref) in runs.items():
        width = ref.length
        spans = ref.spans or ((0, width, int(jax.device_get(state.online.valid).sum())),)
        tokens = np.mean([args.gen_batch * (s[0][1] if s else width) for s in plan])
        s = statistics.median(seconds[b])
        print(f"| {b} | {', '.join(f'{lo + 1}-{hi} ({n})' for lo, hi, n in spans)} | "
              f"{tokens:.0f} | {s:.3f} | {s / base:.2f} |")


def _online_hyper(args, ds, model, mesh, rules):
    from jbilevel.algorithms import online as ol

    cfg = _online_config(args)
    method = MethodConfig(method="bds", hessian_rows=64, hyper_chunk=32, lr_omega=0.1,
                          hypergrad=Implicit("cg", maxiter=2, tol=0.0, ridge=100.0))
    steps = ol.make_online_steps(lm_example_loss(model), model, method, cfg)
    n, m = len(ds), args.hyper_batch or len(ds)
    # the offline rows: the same for every setting, about the median length
    middle = np.argsort(ds.length_N)[max(0, (n - m) // 2):][:m]
    offline = ds.batch(middle, -(-int(ds.length_N[middle].max()) // 64) * 64)
    val = ds.batch(np.arange(32), MAX_LEN)
    runs = {}
    for b in args.buckets:
        ref, compiled, state = _refreshed(cfg, method, steps, ds, model, mesh, rules, b)
        rows = ol.hyper_buffer_rows(ref.capacity, m, n)
        static = ref.hyper_args(rows)(state, 0)
        batches = [jax.device_put(x, compiled.batch_sharding) for x in (offline, val)]
        if args.memory:
            temp = compiled.hyper.lower(state, *batches, *static).compile().memory_analysis()
            print(f"length_buckets {b}: temporaries {temp.temp_size_in_bytes / 2**20:.1f} MiB",
                  flush=True)
            continue
        if not runs:
            print(f"{n} rows; online bds hypergradient steps: {m} offline rows at "
                  f"{offline['input_ids'].shape[1]} tokens and {rows} of the buffer's "
                  f"{ref.capacity} generated rows (a refresh of {args.fraction} of the "
                  f"questions, 2 samples, at most {args.new_tokens} new tokens, cut to the "
                  f"data's response lengths); {jax.devices()[0].platform}", flush=True)
        step = jax.jit(lambda s, a, v, static=static: steps.hyper(s, a, v, *static))
        jax.block_until_ready(step(state, *batches))  # compile
        runs[b] = (step, state, batches, static, ref.length, rows)
    if args.memory:
        return
    seconds: dict[int, list[float]] = {b: [] for b in args.buckets}
    for _ in range(args.rounds):
        for b, (step, state, batches, *_) in runs.items():
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(step(state, *batches))
                seconds[b].append(time.perf_counter() - t0)
    base = statistics.median(seconds[args.buckets[0]])
    print(f"| length_buckets | generated rows taken: rows at width | generated tokens | "
          f"hyper step s | time vs {args.buckets[0]} |")
    print("|---|---|---|---|---|")
    for b, (*_, static, width, rows) in runs.items():
        blocks = static[0] if static else ((0, width, rows),)
        tokens = sum(w * k for _, w, k in blocks)
        s = statistics.median(seconds[b])
        print(f"| {b} | {', '.join(f'{k} at {w}' for _, w, k in blocks)} | {tokens} | "
              f"{s:.2f} | {s / base:.2f} |")


if __name__ == "__main__":
    main()
