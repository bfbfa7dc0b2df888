"""Decoding that stops when every row has: a long token budget costs what the answers need.

    PYTHONPATH=. python benchmarks/decoding.py [--budget 256] [--stop 32] [--steps 3]

A small random Llama (d 256, 4 layers, vocab 4096), greedy, batch 16, 64-token prompts, as
greedy test answers and online refreshes decode: ``max_new_tokens`` is a budget (the longest
reference answer of the split, or ``online.max_new_tokens``), and most answers end far
before it. Rows:

- ``budget B, no end token``: every position decoded (the cost of the budget);
- ``budget B, answers end by S``: the end tokens are the tokens the greedy answers hold at
  position S - 1 (found by a first call), so every row stops at or before S and decoding
  stops there (``Generation.decoded``);
- ``budget S``: the same answers with a budget of S (the cost floor: its KV cache is S long,
  where the budget-B call attends over a cache of B slots).

Each time is the median of --steps calls after one warm-up (compile) call; ratios against the
first row, measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import jax
import numpy as np

from jbilevel.models import ModelConfig, build, generate
from jbilevel.xla_options import tune_host_malloc

BATCH, PROMPT, D, LAYERS, VOCAB = 16, 64, 256, 4, 4096


def _timeit(fn, steps: int) -> float:
    fn()  # compile
    return statistics.median(timeit.repeat(fn, number=1, repeat=steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--stop", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    tune_host_malloc()
    cfg = ModelConfig(family="llama", model_type="llama", vocab_size=VOCAB, hidden_size=D,
                      num_layers=LAYERS, num_heads=D // 64, num_kv_heads=D // 64,
                      intermediate_size=(8 * D // 3 + 63) // 64 * 64,
                      max_position_embeddings=PROMPT + args.budget, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0)
    model = build(cfg)
    params = model.init(jax.random.key(0))
    prompt = jax.random.randint(jax.random.key(1), (BATCH, PROMPT), 3, VOCAB)
    mask = np.ones((BATCH, PROMPT), np.int32)

    def run(budget, stop_ids):
        out = generate(model, params, prompt, mask, jax.random.key(0), max_new_tokens=budget,
                       greedy=True, eos_id=stop_ids)
        return jax.block_until_ready(out)

    free = run(args.budget, None)
    stops = sorted({int(t) for t in np.asarray(free.tokens)[:, 0, args.stop - 1]})
    ended = run(args.budget, stops)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; batch {BATCH}, prompt {PROMPT}, "
          f"budget {args.budget}; with the end tokens {len(stops)} ids, the answers' lengths "
          f"{np.asarray(ended.mask).sum(-1).min()}-{np.asarray(ended.mask).sum(-1).max()}, "
          f"positions decoded {int(ended.decoded)} of {args.budget}")
    rows = [(f"budget {args.budget}, no end token", lambda: run(args.budget, None)),
            (f"budget {args.budget}, answers end by {args.stop}",
             lambda: run(args.budget, stops)),
            (f"budget {args.stop}", lambda: run(args.stop, stops))]
    times = [(name, _timeit(fn, args.steps)) for name, fn in rows]
    print("| decoding | seconds | ratio |\n|---|---|---|")
    for name, t in times:
        print(f"| {name} | {t:.3f} | {t / times[0][1]:.2f} |")


if __name__ == "__main__":
    main()
