"""Small-Llama speed, side by side: jbilevel (JAX/XLA) vs HF transformers (PyTorch eager), CPU.

    PYTHONPATH=. python benchmarks/models.py [--sizes 256 512] [--steps 5] [--data-parallel 2]

Train step = forward + backward + SGD update on next-token NLL (batch 16, seq 128, 4 layers;
the loss is jbilevel's ``token_nll``, the layers unrolled: ``ModelConfig.scan_unroll``).
Generation = greedy, batch 16, 64-token prompt, 64 new tokens, KV cache on both sides.
GFLOP/s uses 6 * matmul params * tokens + 12 * layers * seq * d * tokens (attention) per step
and is compared with a jitted XLA f32 2048^3 matmul measured in the same run (best of 20 calls,
before and after the rows; the higher one). Each time is the median of --steps calls after
three warm-up calls. The process tunes glibc malloc first, as the jbilevel command does
(``tune_host_malloc`` in jbilevel/xla_options.py; torch runs under it too, and was not slower
for it). Timings are only meaningful on an otherwise idle machine (PyTorch slows down
several-fold when other processes run).
--data-parallel N adds a JAX row per size with the batch split over N CPU devices (one XLA
device per core; parameters replicated), the same work in one SPMD program.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import sharding
from jbilevel.losses import token_nll
from jbilevel.models import ModelConfig, build, generate
from jbilevel.xla_options import train_compiler_options, tune_host_malloc

BATCH, SEQ, LAYERS, VOCAB = 16, 128, 4, 4096
PROMPT, NEW = 64, 64


def _config(d: int) -> ModelConfig:
    return ModelConfig(family="llama", model_type="llama", vocab_size=VOCAB, hidden_size=d,
                       num_layers=LAYERS, num_heads=d // 64, num_kv_heads=d // 64,
                       intermediate_size=(8 * d // 3 + 63) // 64 * 64,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, scan_unroll=LAYERS)


def _timeit(fn, steps: int) -> float:
    """Median seconds per call after three warm-up calls (compile, first-touch allocation)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak() -> float:
    """GFLOP/s of XLA's f32 2048^3 matmul: the best of 20 calls, so a moment of load elsewhere
    on the machine cannot lower the bar that the train step is measured against."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def train_flops(c: ModelConfig) -> float:
    d, f, n = c.hidden_size, c.mlp_size, c.num_layers
    matmul_params = n * (4 * d * d + 3 * d * f) + c.vocab_size * d
    tokens = BATCH * SEQ
    return 6 * matmul_params * tokens + 12 * n * SEQ * d * tokens


def jax_side(c: ModelConfig, ids: np.ndarray, steps: int, mesh=None):
    """(train step s, generate s); with a mesh the batch is split over its data axis."""
    model = build(c)
    if mesh is None:
        return _jax_timings(model, model.init(jax.random.key(0)), jnp.asarray(ids), steps)
    # Born on the mesh: resharding single-device arrays onto it tripped an assertion inside
    # jax.device_put (_different_device_order_reshard) in about one run in three.
    rules = sharding.AxisRules()
    params = jax.jit(model.init, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
    x = jax.device_put(ids, sharding.batch_sharding(mesh, rules, 2))
    with sharding.activation_sharding(mesh, rules):
        return _jax_timings(model, params, x, steps)


def _jax_timings(model, params, x, steps: int):
    def loss_fn(p, ids_BxL):  # HF's causal-LM loss: every position but the last, one mean
        logits = model.forward(p, ids_BxL)
        nll_BxL = token_nll(logits, jnp.roll(ids_BxL, -1, axis=1))
        return jnp.mean(nll_BxL[:, :-1])

    def sgd_step(p, ids_BxL):
        loss, g = jax.value_and_grad(loss_fn)(p, ids_BxL)
        return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g), loss

    # the trainer's compile options for its steps (jbilevel/xla_options.py)
    step = jax.jit(sgd_step, compiler_options=train_compiler_options(x.devices().pop().platform))

    state = {"p": params}

    def run():
        state["p"], loss = step(state["p"], x)
        loss.block_until_ready()

    t_train = _timeit(run, steps)
    prompt = x[:, :PROMPT]
    mask = jnp.ones_like(prompt)

    def gen():
        g = generate(model, state["p"], prompt, mask, jax.random.key(0), max_new_tokens=NEW,
                     greedy=True)
        g.tokens.block_until_ready()

    t_gen = _timeit(gen, 2)
    return t_train, t_gen


def torch_side(c: ModelConfig, ids: np.ndarray, steps: int):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in c.to_hf().items()
                                         if k not in ("architectures", "model_type")})
    model = transformers.LlamaForCausalLM(hf_cfg).float()
    model.config._attn_implementation = "eager"
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.tensor(ids.astype(np.int64))

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()

    model.train()
    t_train = _timeit(run, steps)
    model.eval()
    prompt = x[:, :PROMPT]

    def gen():
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)

    t_gen = _timeit(gen, 2)
    return t_train, t_gen


def main():
    tune_host_malloc()  # as the jbilevel command does (jbilevel/xla_options.py)
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--data-parallel", type=int, default=1,
                    help="N > 1 adds JAX rows with the batch split over N CPU devices")
    args = ap.parse_args()
    if BATCH % args.data_parallel:
        raise SystemExit(f"--data-parallel {args.data_parallel} must divide the batch {BATCH}")
    if args.data_parallel > 1:
        jax.config.update("jax_num_cpu_devices", args.data_parallel)
    peak_before = matmul_peak()
    print(f"XLA f32 2048^3 matmul peak: {peak_before:.0f} GFLOP/s   devices: {jax.devices()}",
          flush=True)
    rows = []
    for d in args.sizes:
        c = _config(d)
        ids = np.random.RandomState(0).randint(3, VOCAB, size=(BATCH, SEQ)).astype(np.int32)
        jt, jg = jax_side(c, ids, args.steps)
        print(f"d={d} JAX: train step {jt:.3f} s, generate {jg:.3f} s", flush=True)
        tt, tg = (float("nan"), float("nan")) if args.no_torch else torch_side(c, ids,
                                                                                args.steps)
        print(f"d={d} torch: train step {tt:.3f} s, generate {tg:.3f} s", flush=True)
        rows.append((str(d), c, jt, jg, tt, tg))
        if args.data_parallel > 1:
            mesh = sharding.make_mesh(sharding.MeshConfig(data=args.data_parallel),
                                      jax.devices()[:args.data_parallel])
            jt, jg = jax_side(c, ids, args.steps, mesh)
            print(f"d={d} JAX data-parallel {args.data_parallel}: train step {jt:.3f} s, "
                  f"generate {jg:.3f} s", flush=True)
            rows.append((f"{d} (JAX dp {args.data_parallel})", c, jt, jg, tt, tg))
    # The higher of the peaks measured before and after: the bar for "% of XLA peak".
    peak = max(peak_before, matmul_peak())
    print(f"XLA f32 2048^3 matmul peak: {peak_before:.0f} GFLOP/s before the rows, "
          f"{peak:.0f} GFLOP/s the higher of before and after (the % column's bar)")
    hdr = ("d", "train tok/s JAX", "train tok/s torch", "train JAX/torch", "gen tok/s JAX",
           "gen tok/s torch", "gen JAX/torch", "JAX GFLOP/s", "% of XLA peak")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for label, c, jt, jg, tt, tg in rows:
        gflops = train_flops(c) / jt / 1e9
        print(f"| {label} | {BATCH * SEQ / jt:.0f} | {BATCH * SEQ / tt:.0f} | {tt / jt:.2f}x | "
              f"{BATCH * NEW / jg:.0f} | {BATCH * NEW / tg:.0f} | {tg / jg:.2f}x | "
              f"{gflops:.0f} | {100 * gflops / peak:.0f}% |")


if __name__ == "__main__":
    main()
