"""Model FLOPs utilisation of the training step of a ~1B Llama on one accelerator (bf16).

    PYTHONPATH=. python benchmarks/mfu.py                      # every variant below
    PYTHONPATH=. python benchmarks/mfu.py --variants cudnn,dots,8 --method bmo
    PYTHONPATH=. python benchmarks/mfu.py --variants cudnn,remat,8 cudnn,remat,8,2  # passes

The step is jbilevel's own (``algorithms.make_steps``: loss, backward, clipping and Adam on
f32 master weights, compute in bf16), on a TinyLlama-1.1B-shaped model (d 2048, 22 layers,
32 query / 4 key-value heads, MLP 5632, vocab 32000) with full sequences of random tokens.
Model FLOPs per step follow PaLM's accounting (appendix B): 6 * matmul parameters * tokens
+ 12 * layers * seq * d * tokens, with no credit for rematerialisation. MFU is reported
against the datasheet dense bf16 peak (H100 SXM: 989 TFLOP/s) and against a measured 8192^3
bf16 matmul on the same device. bmo's step also runs the validation batch (same size) through
forward and backward: its FLOPs count both batches. A fourth field in a variant is
``method.train_chunk``: the batch's gradient summed over passes of that many rows (gradient
accumulation), whose cost against the one-pass step on the same batch this measures.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel.algorithms import MethodConfig, init_state, make_steps
from jbilevel.models import ModelConfig, build
from jbilevel.objectives import lm_example_loss

DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
TINYLLAMA = ModelConfig(family="llama", model_type="llama", vocab_size=32000, hidden_size=2048,
                        num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632,
                        max_position_embeddings=4096, compute_dtype="bfloat16")


def model_flops(c: ModelConfig, batch: int, seq: int) -> float:
    d, f, n, k = c.hidden_size, c.mlp_size, c.num_layers, c.dim_per_head
    attn = d * c.num_heads * k * 2 + d * c.kv_heads * k * 2  # q, o and k, v projections
    matmul_params = n * (attn + 3 * d * f) + c.vocab_size * d
    tokens = batch * seq
    return 6 * matmul_params * tokens + 12 * n * seq * d * tokens


def measured_peak() -> float:
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(20):
        out = f(a, b)
    out.block_until_ready()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t) / 1e12


def lm_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict:
    ids = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "attention_mask": ones,
            "loss_mask": ones.astype(np.float32), "ids": np.arange(batch, dtype=np.int32),
            "valid": np.ones(batch, np.float32)}


def attention_parity() -> float:
    """Max |logits(cudnn) - logits(xla)| / max |logits(xla)| on right-padded rows, bf16."""
    c = TINYLLAMA.replace(hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                          intermediate_size=512, vocab_size=1000)
    params = build(c).init(jax.random.key(0))
    ids = np.asarray(jax.random.randint(jax.random.key(1), (4, 256), 3, 1000))
    mask = (np.arange(256)[None, :] < np.array([[256], [200], [17], [128]])).astype(np.int32)
    want = np.asarray(build(c).forward(params, ids, attention_mask=mask))
    got = np.asarray(build(c.replace(attention="cudnn")).forward(params, ids,
                                                                   attention_mask=mask))
    real = mask.astype(bool)
    return float(np.abs(got[real] - want[real]).max() / np.abs(want[real]).max())


def run_variant(c: ModelConfig, method: str, batch: int, seq: int, steps: int,
                train_chunk: int = 0) -> float:
    """Seconds per optimizer step (median of `steps` timed steps after two warm-ups)."""
    model = build(c)
    cfg = MethodConfig(method=method, lr_theta=1e-5, lr_omega=1e-4, train_chunk=train_chunk)
    step = make_steps(lm_example_loss(model), cfg).train
    state = jax.jit(lambda: init_state(model.init(jax.random.key(0)), batch, cfg))()
    rng = np.random.default_rng(0)
    data = jax.device_put(lm_batch(rng, batch, seq, c.vocab_size))
    args = (data, jax.device_put(lm_batch(rng, batch, seq, c.vocab_size))) if method == "bmo" \
        else (data,)
    fn = jax.jit(step, donate_argnums=0)
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        state, metrics = fn(state, *args)
        float(metrics["loss"])  # waits for the step
        if i >= 2:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+",
                   default=["cudnn,noremat,4", "cudnn,remat,8", "cudnn,dots,8", "xla,remat,4"],
                   help="attention,remat (nothing|dots|noremat),batch[,rows per pass]")
    p.add_argument("--method", default="sft", choices=["sft", "bmo"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()

    device = jax.devices()[0]
    name = getattr(device, "device_kind", str(device))
    sheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)
    peak = measured_peak()
    n_params = sum(x.size for x in jax.tree.leaves(
        jax.eval_shape(build(TINYLLAMA).init, jax.random.key(0))))
    print(f"device {name}; model {n_params / 1e9:.2f}B params; measured bf16 matmul peak "
          f"{peak:.0f} TFLOP/s; datasheet {sheet} TFLOP/s")
    if any(v.startswith("cudnn") for v in args.variants):
        print(f"cudnn vs xla attention, bf16 logits, relative max error {attention_parity():.2e}")
    rows = []
    for variant in args.variants:
        attention, remat, batch, *chunk = variant.split(",")
        c = TINYLLAMA.replace(attention=attention, remat=remat != "noremat",
                              remat_policy="dots" if remat == "dots" else "nothing")
        try:
            sec = run_variant(c, args.method, int(batch), args.seq, args.steps,
                              train_chunk=int(chunk[0]) if chunk else 0)
        except Exception as e:  # an OOM in one variant should not hide the others
            rows.append((variant, f"failed: {type(e).__name__}: {str(e)[:80]}"))
            continue
        factor = 2 if args.method == "bmo" else 1
        tflops = factor * model_flops(c, int(batch), args.seq) / sec / 1e12
        tokens = factor * int(batch) * args.seq / sec
        mfu_sheet = f"{100 * tflops / sheet:.1f}%" if sheet else "n/a"
        rows.append((variant, f"{sec * 1e3:8.1f} ms  {tokens:9.0f} tok/s  {tflops:6.1f} TFLOP/s"
                              f"  MFU {mfu_sheet} (datasheet)  {100 * tflops / peak:.1f}% "
                              "(measured matmul)"))
    print(f"\n{args.method} step, seq {args.seq}, bf16 compute, f32 master weights + Adam")
    print(f"{'attention,remat,batch[,pass]':30s} result")
    for variant, result in rows:
        print(f"{variant:30s} {result}")


if __name__ == "__main__":
    main()
