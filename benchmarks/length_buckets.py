"""Padding cost of one sequence length against `data.length_buckets`, side by side.

    PYTHONPATH=. python benchmarks/length_buckets.py [--rounds 3 --buckets 1 2 4 --rows 2048]

SFT data mixes short and long examples (Alpaca: most rows a few hundred tokens, a tail up to
max_len). With one bucket every batch is padded to the longest sequence; with n buckets each
epoch groups rows by length and pads each batch to the smallest of n lengths that holds it
(``jbilevel.data.batching``). Here: ``--rows`` examples whose lengths are log-normal (median
160 tokens, a tail cut at 512), the trainer's own jitted sft step (``train.compile_steps``) on
a small Llama, batch 16. Every bucket's program is compiled before timing; rounds visit the
settings in turn and keep each one's median epoch, so load from other processes hits them
alike. Reported: padded tokens per epoch (and the share that is padding), the epoch's
seconds, and both as ratios to one bucket.
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
from jbilevel.data import Batcher, load_sft
from jbilevel.data.batching import length_buckets
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
    args = ap.parse_args()
    ds = load_sft(_rows(args.rows), prompt_template="{question}", max_len=MAX_LEN)
    model = build(ModelConfig(vocab_size=ds.tokenizer.vocab_size, hidden_size=128,
                              num_layers=2, num_heads=4, intermediate_size=256,
                              max_position_embeddings=MAX_LEN))
    cfg = MethodConfig(method="sft", lr_theta=1e-3)
    mesh = sh.make_mesh(sh.MeshConfig(data=1), jax.devices()[:1])
    rules = sh.AxisRules()

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


if __name__ == "__main__":
    main()
