"""Tokenising and batching throughput: 100k SFT examples, built-in and HF tokenizers.

    PYTHONPATH=. python benchmarks/data.py [--n 100000] [--batch-size 32]

Measures load_sft (schema formatting + tokenisation + packing) and one full Batcher epoch
(shuffled, bucketed, fixed-shape batches) and prints examples/s and seconds for each.

Measured 2026-11-24 on the 2-core dev CPU while other jobs ran (load average ~6, so these are
lower bounds), 100k Alpaca-schema rows of ~231 characters:
  char (built-in):   tokenise 1.95-2.3 s (43-51k ex/s), one epoch of B=32 batches 0.9 s
                     (105-116k ex/s), total 2.8-3.3 s (30-35k ex/s)
  BPE (HF, 2k vocab): tokenise 32 s (3.1k ex/s; the Rust tokenizer's encode_batch is 90% of
                     it), batching 1.1 s, total 33 s (3.0k ex/s)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from jbilevel.data import Batcher, CharTokenizer, load_sft


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 1000, n), rng.integers(0, 1000, n)
    return [{"instruction": f"Add {x} and {y}, then explain briefly.", "input": "",
             "output": f"{x} + {y} = {x + y}. Adding the two numbers gives {x + y}."}
            for x, y in zip(a.tolist(), b.tolist(), strict=True)]


def train_bpe(rows: list[dict], directory: str) -> None:
    """A byte-level BPE (vocab 2000) trained on the rows: a realistic HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<bos>", "<eos>"])
    tok.train_from_iterator((r["instruction"] + " " + r["output"] for r in rows[:20000]), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(directory)


def bench(name: str, rows: list[dict], tokenizer, batch_size: int) -> None:
    t0 = time.perf_counter()
    ds = load_sft(rows, schema="alpaca", tokenizer=tokenizer, max_len=256)
    t1 = time.perf_counter()
    n_tokens = 0
    for batch in Batcher(ds, batch_size, seed=0).epoch_batches():
        n_tokens += int(batch["attention_mask"].sum())
    t2 = time.perf_counter()
    n = len(ds)
    assert n_tokens == len(ds.tokens_T)
    print(f"{name:>5}: tokenise {n} examples {t1 - t0:6.2f} s ({n / (t1 - t0):9,.0f} ex/s) | "
          f"batch one epoch (B={batch_size}) {t2 - t1:6.2f} s ({n / (t2 - t1):9,.0f} ex/s) | "
          f"total {t2 - t0:6.2f} s ({n / (t2 - t0):9,.0f} ex/s), {n_tokens / n:.0f} tokens/ex")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    rows = make_rows(args.n)
    bench("char", rows, CharTokenizer(), args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        train_bpe(rows, tmp)
        bench("bpe", rows, tmp, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        CharTokenizer().to_hf(tmp)  # one pre-token per character: the slow worst case
        bench("hf-ch", rows, tmp, args.batch_size)


if __name__ == "__main__":
    main()
