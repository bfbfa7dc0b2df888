"""Peak host memory of ``jbilevel train`` with a real LLM vocabulary: sft vs bds, side by side.

    PYTHONPATH=. python benchmarks/llm_memory.py [--vocab 151936 --steps 20 --rows 2000]

What a new user does with a Qwen2.5-sized vocabulary on a CPU: a Qwen2-shaped model (vocab
151,936, hidden 256, 2 layers, tied embeddings, random weights) saved as a local HF directory,
a 2,000-row Alpaca-schema JSONL as the SFT set and a 200-row OpenOrca-schema JSONL as
validation, then ``jbilevel train`` with ``method.method=sft`` and with ``method.method=bds``
at the shipped defaults (only the run length and the hypergradient period are set, so that
the run ends in minutes with a few hypergradients). Each run is its own process; its peak
resident memory is read from ``getrusage`` of that child. Printed: peak RSS and wall time per
method and bds / sft.

Before the memory-lean losses and the bounded hypergradient, bds with the defaults died at
its first hypergradient (``RESOURCE_EXHAUSTED`` allocating 42 GB) on this model.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
           "sys.exit(rc)")


def _write_inputs(root: Path, vocab: int, rows: int) -> tuple[Path, Path, Path]:
    import jax
    import numpy as np

    from jbilevel.data import CharTokenizer
    from jbilevel.models import ModelConfig, build, save_pretrained

    tok = CharTokenizer()
    config = ModelConfig(family="llama", model_type="qwen2", vocab_size=vocab, hidden_size=256,
                         num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=1024,
                         qkv_bias=True, tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
    model_dir = root / "qwen2-shaped"
    save_pretrained(str(model_dir), build(config).init(jax.random.key(0)), config)
    tok.to_hf().save_pretrained(str(model_dir))
    rng = np.random.default_rng(0)

    def qa(i):
        a, b = (int(x) for x in rng.integers(0, 999, 2))
        return f"Add {a} and {b}.", f"{a} + {b} = {a + b}. The sum of {a} and {b} is {a + b}."

    train = root / "train.jsonl"
    with open(train, "w") as f:
        for i in range(rows):
            q, r = qa(i)
            f.write(json.dumps({"instruction": q, "input": "", "output": r}) + "\n")
    val = root / "validation.jsonl"
    with open(val, "w") as f:
        for i in range(200):
            q, r = qa(i)
            f.write(json.dumps({"system_prompt": "", "question": q, "response": r}) + "\n")
    return model_dir, train, val


def _run(method: str, model_dir: Path, train: Path, val: Path, out: Path, steps: int,
         hyper_every: int) -> dict:
    cmd = [sys.executable, "-m", "jbilevel.cli", "train", "--out", str(out),
           f"model.path={model_dir}", f"data.train={train}", f"data.validation={val}",
           f"method.method={method}", f"loop.steps={steps}", "loop.progress=false",
           f"method.hyper_every={hyper_every}", "loop.checkpoint_every=0"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"{method}: jbilevel train exited {done.returncode}")
    kb = int(done.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0])
    results = json.loads((out / "results.json").read_text())
    return {"method": method, "peak_rss_gb": kb / 2**20, "seconds": seconds,
            "steps": results["steps"], "val_loss": results["val_loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--rows", type=int, default=2000, help="SFT rows")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hyper-every", type=int, default=10)
    p.add_argument("--max-ratio", type=float, default=2.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, train, val = _write_inputs(root, args.vocab, args.rows)
        rows = [_run(m, model_dir, train, val, root / m, args.steps, args.hyper_every)
                for m in ("sft", "bds")]
    print(f"CPU: {platform.processor() or platform.machine()}; vocab {args.vocab}, "
          f"{args.rows} SFT rows, {args.steps} steps, a hypergradient every {args.hyper_every}")
    print("| method | peak RSS GB | wall s | steps | val loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['peak_rss_gb']:.2f} | {r['seconds']:.0f} | {r['steps']} | "
              f"{r['val_loss']:.3f} |")
    ratio = rows[1]["peak_rss_gb"] / rows[0]["peak_rss_gb"]
    verdict = "ok" if ratio <= args.max_ratio else "FAIL"
    print(f"bds / sft peak RSS: {ratio:.2f} (target <= {args.max_ratio}): {verdict}")
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
