"""The one-GPU recipes end to end on this host's accelerator, with random weights of their shape.

    PYTHONPATH=. python benchmarks/one_gpu.py --out /tmp/one_gpu          # both recipes
    PYTHONPATH=. python benchmarks/one_gpu.py --out /tmp/og --recipes lora --steps 8

For each recipe (``configs/qwen2.5_1.5b_1gpu_bds.yaml``, full fine-tuning, and
``configs/qwen2.5_1.5b_lora_1gpu_bds.yaml``, LoRA) it runs ``jbilevel train --config <recipe>``
unchanged except for the loop's length (``--steps``, a hypergradient every ``--hyper-every``
steps from that step on, no periodic checkpoint), on files this script writes:

- a model directory of the preset's architecture (Qwen2.5-1.5B: 28 layers, vocabulary 151,936)
  with random weights (jbilevel's own init, saved in bf16 with ``hf_io.save_pretrained``) and
  the shipped base model's tokenizer and chat template, whose ids all fit the vocabulary;
- an Alpaca-schema training file and a validation file whose rows are longer than
  ``data.max_len``, so every batch is full (the recipes truncate).

The training run goes through the CLI in a child process that times every train and
hypergradient step (blocking on each, so the host does not run ahead) and reads the
accelerator's peak memory after each. The table: the first call of each step (compile + run),
the median of the others, tokens per second of the train step, and the peak memory after the
train steps before the first hypergradient and after the whole run. Random weights make the
losses meaningless; the steps' cost and memory are those of the real model.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {"full": "configs/qwen2.5_1.5b_1gpu_bds.yaml",
           "lora": "configs/qwen2.5_1.5b_lora_1gpu_bds.yaml"}
GIB = 2**30


def _child(record: str, argv: list[str]) -> int:
    """Runs ``jbilevel <argv>`` with the trainer's steps timed; writes the timings to record."""
    import jax

    from jbilevel import cli, train

    device = jax.local_devices()[0]
    calls: list[dict] = []
    t = time.perf_counter()

    def peak() -> int | None:
        stats = device.memory_stats()  # None on the CPU
        return stats.get("peak_bytes_in_use") if stats else None

    def write(rc):  # after every step too, so a run stopped by --timeout leaves its figures
        Path(record).write_text(json.dumps({
            "rc": rc, "wall_s": time.perf_counter() - t, "peak": peak(), "calls": calls,
            "device": getattr(device, "device_kind", str(device))}))

    def timed(fn, name):
        def call(*args):
            s = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            calls.append({"step": name, "s": time.perf_counter() - s, "peak": peak()})
            write(None)
            return out
        return call

    compile_steps = train.compile_steps

    def timed_steps(*args, **kwargs):
        c = compile_steps(*args, **kwargs)
        return dataclasses.replace(c, train=timed(c.train, "train"),
                                   hyper=c.hyper and timed(c.hyper, "hyper"))

    train.compile_steps = timed_steps
    rc = 1
    try:
        rc = cli.main(argv)
    finally:
        write(rc)
    return rc


def write_model(path: Path, preset_name: str, layers: int | None) -> None:
    """A random-weight HF directory of the preset's shape with the shipped tokenizer."""
    import jax
    import jax.numpy as jnp

    from jbilevel.models import base_model_path, build
    from jbilevel.models.hf_io import save_pretrained
    from jbilevel.models.presets import preset

    config = preset(preset_name, **({"num_layers": layers} if layers else {}))
    t = time.perf_counter()
    params = build(config).init(jax.random.key(0), jnp.bfloat16)  # on the CPU (see main)
    save_pretrained(str(path), params, config)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(base_model_path()) / name, path / name)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {preset_name}, {config.num_layers} layers, {n / 1e9:.2f}B parameters, random "
          f"bf16 weights written to {path} in {time.perf_counter() - t:.0f} s", flush=True)


def write_data(folder: Path, rows: int, val_rows: int, words: int) -> tuple[Path, Path]:
    """Alpaca-schema train and validation files of arithmetic text longer than max_len."""
    import numpy as np

    rng = np.random.default_rng(0)

    def text(n):
        a, b = rng.integers(100, 1000, (2, n))
        return " ".join(f"{x} + {y} = {x + y}." for x, y in zip(a, b, strict=True))

    def write(path, n):
        with open(path, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"instruction": "Add the numbers: " + text(words // 2),
                                    "input": "", "output": text(words)}) + "\n")
        return path

    folder.mkdir(parents=True, exist_ok=True)
    return write(folder / "train.jsonl", rows), write(folder / "val.jsonl", val_rows)


def summary(name: str, rec: dict, tokens_per_step: int) -> dict:
    def of(step):
        return [c for c in rec["calls"] if c["step"] == step]

    def median(xs):
        return statistics.median(xs) if xs else None

    train_calls, hyper_calls = of("train"), of("hyper")
    before_hyper = [c["peak"] for c in
                    itertools.takewhile(lambda c: c["step"] != "hyper", rec["calls"])]
    step_s = median([c["s"] for c in train_calls[1:]])
    return {
        "recipe": name, "rc": rec["rc"], "device": rec["device"], "wall_s": rec["wall_s"],
        "train_first_s": train_calls[0]["s"] if train_calls else None,
        "train_step_s": step_s, "tokens_per_s": tokens_per_step / step_s if step_s else None,
        "hyper_first_s": hyper_calls[0]["s"] if hyper_calls else None,
        "hyper_s": median([c["s"] for c in hyper_calls[1:]]),
        "hypergradients": len(hyper_calls), "train_steps": len(train_calls),
        "peak_train_gib": max(before_hyper) / GIB if before_hyper and before_hyper[-1] else None,
        "peak_gib": rec["peak"] / GIB if rec["peak"] else None,
    }


def table(rows: list[dict]) -> str:
    cols = [("recipe", "recipe", "{}"), ("train steps", "train_steps", "{}"),
            ("train 1st call s", "train_first_s", "{:.1f}"), ("train step s", "train_step_s",
                                                              "{:.3f}"),
            ("tokens/s", "tokens_per_s", "{:,.0f}"), ("hypergrads", "hypergradients", "{}"),
            ("hyper 1st call s", "hyper_first_s", "{:.1f}"), ("hyper s", "hyper_s", "{:.2f}"),
            ("peak GiB, train steps", "peak_train_gib", "{:.1f}"),
            ("peak GiB, run", "peak_gib", "{:.1f}"), ("run wall s", "wall_s", "{:.0f}")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("n/a" if r.get(k) is None else fmt.format(r[k])
                                       for _, k, fmt in cols) + " |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return _child(sys.argv[2], sys.argv[4:])  # --child RECORD -- <jbilevel argv>
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the model, data, runs and results")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers (a CPU smoke test)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--hyper-every", type=int, default=4)
    p.add_argument("--rows", type=int, default=512, help="training rows (weights)")
    p.add_argument("--val-rows", type=int, default=64)
    p.add_argument("--words", type=int, default=200, help="sums per response (~10 tokens each)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per recipe run")
    p.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    args = p.parse_args()

    import jax
    import yaml

    jax.config.update("jax_platforms", "cpu")  # this process writes files; the runs use the GPU
    out = Path(args.out)
    model = out / (f"model-{args.preset}" + (f"-{args.layers}layers" if args.layers else ""))
    if not (model / "model.safetensors").exists():
        write_model(model, args.preset, args.layers)
    train_file, val_file = write_data(out / "data", args.rows, args.val_rows, args.words)
    repo = Path(__file__).resolve().parents[1]
    rows = []
    for name in args.recipes:
        run_dir, record = out / f"run-{name}", out / f"run-{name}.json"
        shutil.rmtree(run_dir, ignore_errors=True)
        record.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", str(record), "--", "train", "--config",
               str(repo / RECIPES[name]), "--out", str(run_dir), f"model.path={model}",
               f"data.train={train_file}", f"data.validation={val_file}",
               f"loop.steps={args.steps}", f"method.hyper_start={args.hyper_every}",
               f"method.hyper_every={args.hyper_every}", "loop.checkpoint_every=0",
               f"loop.eval_every={args.steps}", *args.overrides]
        print(f"\n== {name}: {' '.join(cmd[5:])}", flush=True)
        t = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])}
        try:
            subprocess.run(cmd, env=env, timeout=args.timeout, check=False)
        except subprocess.TimeoutExpired:
            print(f"{name}: stopped after {args.timeout:.0f} s", flush=True)
        if not record.exists():
            print(f"{name}: no record (the run died after {time.perf_counter() - t:.0f} s)")
            continue
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())  # the settings that applied
        tokens = cfg["batch_size"] * cfg["data"]["max_len"]  # every row fills max_len
        rows.append(summary(name, json.loads(record.read_text()), tokens))
        print(table(rows[-1:]), flush=True)
    (out / "one_gpu.json").write_text(json.dumps(rows, indent=2))
    print("\n" + table(rows))
    return 0 if rows and all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
