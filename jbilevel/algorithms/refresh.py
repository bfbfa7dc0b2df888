"""The host side of online generation: which questions to refresh, the sampler calls, the
buffer of generated pairs and its log (``generations.jsonl``). The training steps that consume
the buffer are in :mod:`jbilevel.algorithms.online`."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import distributed, report, weights
from jbilevel import sharding as sh
from jbilevel.adjoint import chunk_rows, interleaved_chunks
from jbilevel.algorithms.offline import TrainState
from jbilevel.algorithms.online import (
    Buffer,
    OnlineConfig,
    generated_buckets,
    generated_spans,
    generated_strata,
    importance_ratio,
    init_buffer,
    token_logprobs,
)
from jbilevel.config import ConfigError
from jbilevel.data.batching import length_buckets, smallest_bucket


@functools.partial(jax.jit, static_argnames=("n", "mode", "weighting"))
def select_questions(key, omega_N, *, n: int, mode: str, weighting: str) -> jax.Array:
    """The ``n`` questions to refresh: random, or the lowest-weighted ("dynamic", ties broken
    at random). Returns ids_n (int32)."""
    perm_N = jax.random.permutation(key, omega_N.shape[0])
    if mode == "random":
        return perm_N[:n].astype(jnp.int32)
    if mode != "dynamic":
        raise ValueError(f"select={mode!r}: use 'random' or 'dynamic'")
    s_N = jnp.take(weights.weights(omega_N, weighting), perm_N)
    return jnp.take(perm_N, jnp.argsort(s_N, stable=True)[:n]).astype(jnp.int32)


def pack(prompt_ids_BxP, prompt_mask_BxP, tokens_BxGxT, mask_BxGxT, logp_BxGxT, ids_B, valid_B,
         pad_id: int, width: int | None = None) -> dict:
    """Generated samples as training rows (the :class:`Buffer` layout), G rows per prompt;
    rows of invalid prompts get no loss tokens. ``width``: the buffer's row length, at least
    P + T (default P + T); the rows are padded on the right to it, so that sampler calls whose
    prompts are padded to fewer tokens than the longest prompt fill the same buffer.

    The sampler's prompts are left-padded; each row is rolled left past its padding so its
    real tokens come first, as in training batches: the fused attention paths
    (``model.attention`` dot_product / cudnn) take per-row lengths and would otherwise
    attend to the padding and miss the response.
    """
    b, g, t = tokens_BxGxT.shape
    rep = functools.partial(jnp.repeat, repeats=g, axis=0)
    tokens, mask = tokens_BxGxT.reshape(b * g, t), mask_BxGxT.reshape(b * g, t)
    input_ids = jnp.concatenate([rep(prompt_ids_BxP), tokens], axis=1).astype(jnp.int32)
    attention = jnp.concatenate([rep(prompt_mask_BxP), mask], axis=1).astype(jnp.int32)
    pad_col = jnp.full((b * g, 1), pad_id, jnp.int32)
    lead = jnp.zeros((b * g, prompt_ids_BxP.shape[1] - 1), jnp.float32)
    tail = jnp.zeros((b * g, 1), jnp.float32)
    valid_R = rep(valid_B).astype(jnp.float32)
    loss_mask = jnp.concatenate([lead, mask.astype(jnp.float32) * valid_R[:, None], tail],
                                axis=1)
    logp_RxT = jnp.where(loss_mask[:, prompt_ids_BxP.shape[1] - 1:-1] > 0,
                       logp_BxGxT.reshape(b * g, t), 0.0)
    logp = jnp.concatenate([lead, logp_RxT, tail], axis=1)
    rows = {"input_ids": input_ids, "attention_mask": attention,
            "labels": jnp.concatenate([input_ids[:, 1:], pad_col], axis=1),
            "loss_mask": loss_mask, "logp": logp}
    # the wrapped-around padding lands at the end with no attention and no loss
    pads_R = prompt_ids_BxP.shape[1] - jnp.sum(rep(prompt_mask_BxP), axis=1)
    length = input_ids.shape[1]
    from_RxL = (jnp.arange(length)[None, :] + pads_R[:, None]) % length
    rows = {k: jnp.take_along_axis(v, from_RxL, axis=1) for k, v in rows.items()}
    extra = 0 if width is None else width - length
    rows = {k: jnp.pad(v, ((0, 0), (0, extra)),
                       constant_values=pad_id if k in ("input_ids", "labels") else 0)
            for k, v in rows.items()}
    return {**rows, "ids": rep(ids_B).astype(jnp.int32), "valid": valid_R}


def calls(cfg: OnlineConfig, n: int, ways: int) -> tuple[int, int, int]:
    """How a refresh of ``n`` training questions samples: (questions selected, prompts per
    sampler call, sampler calls). A call's prompts are ``cfg.generate_batch_size`` (0: all
    selected questions) rounded up to a multiple of ``ways`` (the rows' data-parallel split),
    so the buffer holds ``calls x prompts x cfg.num_samples`` rows."""
    n_select = max(1, round(cfg.fraction * n))
    chunk = cfg.generate_batch_size or n_select
    chunk = -(-chunk // ways) * ways
    return n_select, chunk, -(-n_select // chunk)


def sample(model, cfg: OnlineConfig, theta, prompt_ids_BxP, prompt_mask_BxP, key, *,
           max_new_tokens: int, eos_id, pad_id: int, mesh, rules: sh.AxisRules, base=None,
           lower: bool = False):
    """One sampler call of a refresh: ``cfg.num_samples`` responses to each left-padded prompt
    (``jbilevel.models.generate`` with the refresh's sampling settings, on ``mesh``). With
    ``base``, ``theta`` is LoRA adapters over it, decoded unmerged. ``lower``: the call's
    program lowered for these (possibly abstract) arguments, not run (``generate``'s)."""
    from jbilevel.models import generate

    params, lora = (theta, None) if base is None else (base, theta)
    return generate(model, params, prompt_ids_BxP, prompt_mask_BxP, key,
                    max_new_tokens=max_new_tokens, num_samples=cfg.num_samples,
                    temperature=cfg.temperature, top_p=cfg.top_p, eos_id=eos_id, pad_id=pad_id,
                    lora=lora, mesh=mesh, rules=rules, gather_params=cfg.gather_params,
                    lower=lower)


def row_ratios(model, cfg: OnlineConfig, theta, buffer: Buffer, base=None, *, rows: int,
               mesh=None, rules: sh.AxisRules | None = None):
    """Each buffer row's mean token importance ratio under ``theta`` (LoRA adapters over
    ``base`` when given) and its summed sampling log-prob (R each), for the log. The forward
    runs over ``rows`` rows at a time (one sampler call's worth, which the run sized to
    fit), rows ``c, c + R / rows, ...`` together: with the buffer's rows split over devices
    in contiguous blocks, every pass takes as many rows from each device, so nothing moves
    between devices. On ``mesh`` the activations are
    pinned to the rows' split (``rules``), as in a train step: left to itself, XLA follows
    the fsdp-split weights and every device computes every row's logits."""
    if mesh is not None:
        with sh.activation_sharding(mesh, rules or sh.AxisRules()):
            return row_ratios(model, cfg, theta, buffer, base, rows=rows)

    def one(gen):
        logp_cur = token_logprobs(model, theta, gen, base)
        ratio, _ = importance_ratio(logp_cur, gen["logp"], gen["loss_mask"], kind=cfg.ratio,
                                    clip=cfg.clip, floor=cfg.floor)
        count = jnp.maximum(jnp.sum(gen["loss_mask"], axis=-1), 1.0)
        return jnp.sum(ratio, axis=-1) / count, jnp.sum(gen["logp"], axis=-1)

    capacity = buffer.valid.shape[0]
    passes = capacity // rows
    if passes * rows != capacity:
        raise ValueError(f"rows={rows} must divide the buffer's {capacity} rows")
    if passes == 1:
        return one(buffer.batch())
    out = jax.lax.map(one, interleaved_chunks(buffer.batch(), rows))  # row c + k * passes: pass c
    return tuple(chunk_rows(o, capacity) for o in out)


def _host(x) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def buffer_buckets(cfg: OnlineConfig, dataset, buckets: int, ways: int
                   ) -> tuple[tuple[int, int, int], ...]:
    """The length buckets of an online run's generated rows (``data.length_buckets`` =
    ``buckets``; :func:`~jbilevel.algorithms.online.generated_buckets`), as the run fixes
    them before it generates anything and ``scripts/compile_check.py`` compiles them: the
    training rows' lengths as buffer rows (each prompt and at most ``max_new_tokens`` of its
    response) stand in for the generated rows', in the buffer a run on ``ways`` data-parallel
    devices fills (:func:`calls`; :attr:`Refresher.capacity` rows), as wide as the longest
    prompt and ``max_new_tokens``."""
    _, chunk, n_chunks = calls(cfg, len(dataset), ways)
    response_N = dataset.length_N - dataset.prompt_len_N
    new_tokens = cfg.max_new_tokens or int(response_N.max())
    return generated_buckets(dataset.prompt_len_N + np.minimum(response_N, new_tokens),
                             buckets, int(dataset.prompt_len_N.max()) + new_tokens,
                             n_chunks * chunk * cfg.num_samples, cfg.batch_size)


class Refresher:
    """The host side of online generation: ``(state, step) -> (state, metrics)`` before each
    train step; at ``cfg.start`` and every ``cfg.every`` steps after it regenerates the buffer
    (``train.run``'s ``before_step``). Before the first refresh the buffer is empty and the
    steps train on offline rows only.

    Args:
      cfg: online settings.
      model: the Model (its ``config`` drives the sampler; its chunked ``token_nll`` gives
        the ratios in the log).
      dataset: the training SFTDataset (questions = its prompts; ids index omega).
      weighting: omega -> weights map (for "dynamic" selection and the log).
      batch_sharding: where batch rows go (its mesh also places the selected ids, and the
        sampler runs on it: KV cache split with the rows, weights gathered once per call).
      rules: the run's logical-axis table (default ``AxisRules()``).
      seed: refresh ``k`` uses ``fold_in(key(seed), step)`` (so resumes are exact).
      log_dir: where ``generations.jsonl`` goes (None: no log).
      scorer: optional ``scorer(texts, rows) -> {metric: value}`` (a task's metric) to score
        each refresh's responses against their source rows.
      buckets: prompt lengths the sampler calls pad to (``data.length_buckets``): 1 pads every
        call's prompts to the training set's longest prompt; n > 1 sorts the selected
        questions by prompt length and pads each call's prompts to the smallest of n lengths
        (quantiles of the prompt lengths) that holds them, one sampler program per length.
        Either way the rows fill a buffer of one row length (longest prompt +
        ``max_new_tokens``); with n > 1 each train step draws its generated rows from one of
        up to n length buckets, fixed for the run (:attr:`generated_buckets`, from
        :func:`buffer_buckets`), cut to its width (:meth:`train_args`).
      console: where each refresh says what it sampled and how long it took (None: silent).
    """

    def __init__(self, cfg: OnlineConfig, model, dataset, *, weighting: str, batch_sharding,
                 seed: int = 0, log_dir: str | Path | None = None, scorer=None,
                 rules: sh.AxisRules | None = None, buckets: int = 1, console=None):
        if not cfg.enabled:
            raise ValueError("Refresher needs online.every > 0")
        self.cfg, self.model, self.dataset = cfg, model, dataset
        self.weighting, self.batch_sharding, self.seed = weighting, batch_sharding, seed
        self.scorer, self.rules = scorer, rules or sh.AxisRules()
        self.console = console
        self.log_path = None if log_dir is None else Path(log_dir) / "generations.jsonl"
        n = len(dataset)
        mesh = batch_sharding.mesh
        split = math.prod(mesh.shape[a] for a in _batch_axes(batch_sharding))
        ways = math.lcm(split, jax.process_count())  # sampler calls split like batches
        self.n_select, self.chunk, self.n_chunks = calls(cfg, n, ways)
        if cfg.batch_size % split:  # each train step's draw splits over the devices like a batch
            raise ConfigError(
                f"online.batch_size={cfg.batch_size} is not divisible by the mesh's "
                f"data-parallel size {split} (mesh.data x mesh.fsdp); change online.batch_size "
                "or the mesh")
        self.prompt_len = int(dataset.prompt_len_N.max())
        self.prompt_lengths = length_buckets(dataset.prompt_len_N, buckets, top=self.prompt_len)
        self.buckets = buckets
        self.spans = None  # the buffer's generated_spans (buckets > 1), once it has rows
        longest = int((dataset.length_N - dataset.prompt_len_N).max())
        self.max_new_tokens = cfg.max_new_tokens or longest
        if cfg.batch_size > self.capacity:
            raise ConfigError(
                f"online.batch_size={cfg.batch_size} > the buffer's {self.capacity} rows "
                f"(fraction {cfg.fraction} x {n} questions x {cfg.num_samples} samples); lower "
                "online.batch_size or raise online.fraction / online.num_samples")
        # the generated rows' length buckets, fixed before any is generated, so that every
        # train step and sampled hypergradient has its program from the start
        self.generated_buckets = buffer_buckets(cfg, dataset, buckets, ways)
        rep = sh.replicated(batch_sharding.mesh)
        self._select = jax.jit(functools.partial(
            select_questions, n=self.n_select, mode=cfg.select, weighting=weighting),
            out_shardings=rep)
        self._pack = jax.jit(functools.partial(pack, pad_id=dataset.pad_id, width=self.length))
        self._weights = jax.jit(lambda omega, ids: weights.batch_weights(omega, ids, weighting),
                                out_shardings=rep)
        self._ratios = jax.jit(functools.partial(
            row_ratios, model, cfg, rows=self.chunk * cfg.num_samples, mesh=mesh,
            rules=self.rules))
        self._concat = None  # jitted on the first refresh (needs the buffer's shardings)

        def sampler(theta, prompts, key, base):  # one call: its program compiled per width
            return sample(model, cfg, theta, prompts["prompt_ids"], prompts["prompt_mask"], key,
                          max_new_tokens=self.max_new_tokens, eos_id=dataset.tokenizer.stop_ids,
                          pad_id=dataset.pad_id, mesh=mesh, rules=self.rules, base=base)

        # each prompt width's first call says how long its compilation took (or that the
        # program came from the compilation cache, e.g. one compile_check.py filled)
        self._sample = sampler if console is None else console.first_call(sampler, "sampler")

    @property
    def capacity(self) -> int:
        """Buffer rows: selected questions (padded to whole sampler calls) x G."""
        return self.n_chunks * self.chunk * self.cfg.num_samples

    @property
    def length(self) -> int:
        """Buffer row length: longest prompt + max_new_tokens."""
        return self.prompt_len + self.max_new_tokens

    def init_buffer(self) -> Buffer:
        return init_buffer(self.capacity, self.length)

    def train_args(self, state: TrainState, step: int) -> tuple:
        """The online train step's static arguments at ``step`` (``train.run``'s
        ``train_args``): with length buckets, ``gen_span``, the bucket of the buffer's rows
        its generated rows are drawn from (:attr:`generated_buckets`, fixed for the run, so
        one program each), chosen with probability proportional to its rows, so every row is
        drawn as often as in a draw from the whole buffer, and a step's rows are alike in
        length. The choice depends on the seed, the step and the buffer alone (a resumed run
        makes the same ones). One length: no arguments."""
        spans = self._current_spans(state)
        if spans is None:
            return ()
        rows = np.array([n for _, _, n in spans], np.float64)
        pick = np.random.default_rng([self.seed % 2**64, step]).choice(len(rows),
                                                                   p=rows / rows.sum())
        shorter, width, _ = spans[pick]
        return ((shorter, width),)

    def hyper_args(self, rows: int, ways: int = 1) -> Callable[[TrainState, int], tuple]:
        """``train.run``'s ``hyper_args`` for a bds hypergradient that takes ``rows`` of the
        buffer's rows (:func:`~jbilevel.algorithms.online.hyper_buffer_rows`) on ``ways``
        data-parallel devices: with length buckets, ``gen_blocks``, how many it takes from
        each bucket, each cut to its width (:func:`~jbilevel.algorithms.online.
        generated_strata`): a share in multiples of ``ways``, in proportion to the rows a full
        buffer is expected to hold (:attr:`generated_buckets`), so one program serves every
        refresh (the step scales each share by the rows there are); or, where ``rows`` is
        the whole buffer, every row of each bucket, which follows the buffer (a program per
        refresh whose counts differ). One length, or an empty buffer: no arguments."""
        every = rows >= self.capacity

        def args(state: TrainState, step: int) -> tuple:
            spans = self._current_spans(state)
            if spans is None:
                return ()
            return (generated_strata(spans if every else self.generated_buckets, rows, ways),)

        return args

    def _current_spans(self, state: TrainState):
        """The buffer's spans (None: one length, or no row yet)."""
        if self.buckets <= 1:
            return None
        if self.spans is None:  # a resumed run: the spans of the checkpoint's buffer
            self.spans = self._spans(state.online)
        return self.spans

    def _spans(self, buffer: Buffer):
        valid = _host(buffer.valid) > 0
        if not valid.any():
            return None
        length_R = _host(jnp.sum(buffer.attention_mask, axis=1))[valid]
        return generated_spans(length_R, self.generated_buckets)

    def __call__(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        if step < self.cfg.start or (step - self.cfg.start) % self.cfg.every:
            return state, {}
        self.log_buffer(state, step)  # the rows being replaced, with their final ratios
        if self.console is None:
            return self._refresh(state, step)
        with self.console.phase(f"online refresh at step {step}") as phase:
            state, metrics = self._refresh(state, step)
            scores = "".join(f", {k[len('online_gen_'):]} {v:.3g}" for k, v in metrics.items()
                             if k.startswith("online_gen_") and k != "online_gen_len")
            phase.summary = (
                f"{int(metrics['online_refreshed'])} questions, {self.cfg.num_samples} "
                f"response{'s' * (self.cfg.num_samples > 1)} each in {self.n_chunks} sampler "
                f"call{'s' * (self.n_chunks > 1)}, {metrics['online_gen_len']:.1f} tokens a "
                f"response{scores}" + ("" if self.spans is None else (
                    "; train steps draw them from " + ", ".join(
                        f"{n} rows of {shorter + 1}-{width} tokens"
                        for shorter, width, n in self.spans if n))))
        return state, metrics

    def _refresh(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        key_sel, key_gen = jax.random.split(jax.random.fold_in(jax.random.key(self.seed), step))
        chosen = _host(self._select(key_sel, state.omega))
        prompt_N = self.dataset.prompt_len_N
        if len(self.prompt_lengths) > 1:  # longest first: each call's prompts alike in length
            chosen = chosen[np.argsort(-prompt_N[chosen], kind="stable")]
        # padding slots sample the last chosen question (the sampler needs a real prompt, and
        # this one fits the last call's length), marked invalid
        padded = np.full(self.n_chunks * self.chunk, chosen[-1], np.int64)
        padded[: len(chosen)] = chosen
        valid = np.arange(len(padded)) < len(chosen)
        rows = []
        for c in range(self.n_chunks):
            part = slice(c * self.chunk, (c + 1) * self.chunk)
            width = smallest_bucket(self.prompt_lengths, prompt_N[padded[part]].max())
            prompts = self.dataset.prompt_batch(padded[part], width)
            prompts["valid"] = valid[part].astype(np.float32)
            local = distributed.process_slice(self.chunk)
            prompts = distributed.global_batch({k: v[local] for k, v in prompts.items()},
                                               self.batch_sharding)
            gen = self._sample(state.theta, prompts, jax.random.fold_in(key_gen, c),
                               state.frozen)
            logp = gen.logprobs if self.cfg.denominator == "model" else gen.sampling_logprobs
            rows.append(self._pack(prompts["prompt_ids"], prompts["prompt_mask"], gen.tokens,
                                   gen.mask, logp, prompts["ids"], prompts["valid"]))
        buffer = self._assemble(rows, step, state.online)
        state = state.replace(online=buffer)
        if self.buckets > 1:
            self.spans = self._spans(buffer)
        # the trainer logs these with every later step until the next refresh: the step marks
        # which refresh they describe (the buffer's and generations.jsonl's generated_at)
        metrics = {"online_refresh_step": float(step), "online_refreshed": float(len(chosen)),
                   "online_selected_weight": float(np.mean(_host(
                       self._weights(state.omega, jnp.asarray(chosen, jnp.int32)))))}
        gen_len = _host(jnp.sum(buffer.loss_mask, axis=1))[_host(buffer.valid) > 0]
        metrics["online_gen_len"] = float(gen_len.mean())
        if self.scorer is not None:
            ids_R, texts = self._texts(buffer)
            scored = self.scorer(texts, [self.dataset.rows[i] for i in ids_R])
            metrics.update({f"online_gen_{k}": float(v) for k, v in scored.items()
                            if k != "n" and isinstance(v, int | float)})
        return state, metrics

    def _assemble(self, rows: list[dict], step: int, like: Buffer) -> Buffer:
        if self._concat is None:
            def concat(rows, step):
                cat = {k: jnp.concatenate([r[k] for r in rows]) for k in rows[0]}
                return Buffer(**cat, born=jnp.asarray(step, jnp.int32))

            self._concat = jax.jit(concat, out_shardings=jax.tree.map(lambda x: x.sharding,
                                                                       like))
        return self._concat(rows, step)

    def _texts(self, buffer: Buffer) -> tuple[np.ndarray, list[str]]:
        valid = _host(buffer.valid) > 0
        ids = _host(buffer.ids)[valid]
        tokens = _host(buffer.labels)[valid]  # the response: the labels that carry a loss
        mask = _host(buffer.loss_mask)[valid] > 0
        tok = self.dataset.tokenizer
        eos = tok.eos_id
        texts = [tok.decode([t for t in row[m] if t != eos]) for row, m in zip(tokens, mask,
                                                                                strict=True)]
        return ids, texts

    def trim_log(self, resumed_from: int, *, complete: bool) -> int:
        """Drops the rows of ``generations.jsonl`` that a run resumed from its checkpoint of
        step ``resumed_from`` writes again: those logged by the refresh at that step or
        later (it runs after the checkpoint is saved) and the final log, unless the run was
        ``complete`` (it only evaluates again, and logs nothing). Returns: how many."""
        if self.log_path is None:
            return 0
        last = resumed_from if complete else resumed_from - 1
        return report.trim_records(self.log_path, lambda row: row["step"] <= last)

    def log_buffer(self, state: TrainState, step: int) -> None:
        """Appends the buffer's rows to ``generations.jsonl``: ``step`` (now), ``generated_at``,
        question ``id``, ``sample``, ``text``, ``ratio`` (the row's mean token ratio under the
        current theta; per_sequence: the sequence ratio), ``weight`` s_id(omega) now and
        ``logp`` (summed sampling log-prob)."""
        born = int(_host(state.online.born))
        if self.log_path is None or born < 0:
            return
        ratio_R, logp_R = (_host(x) for x in self._ratios(state.theta, state.online,
                                                          state.frozen))
        valid = _host(state.online.valid) > 0
        ids, texts = self._texts(state.online)
        w = _host(self._weights(state.omega, jnp.asarray(ids, jnp.int32)))
        rows = np.flatnonzero(valid)
        if jax.process_index() != 0:
            return
        with open(self.log_path, "a") as f:
            for k, r in enumerate(rows):
                f.write(json.dumps({
                    "step": step, "generated_at": born, "id": int(ids[k]),
                    "sample": int(r % self.cfg.num_samples), "text": texts[k],
                    "ratio": round(float(ratio_R[r]), 6), "weight": round(float(w[k]), 6),
                    "logp": round(float(logp_R[r]), 4)}) + "\n")


def _batch_axes(sharding) -> tuple[str, ...]:
    spec = sharding.spec[0] if len(sharding.spec) else None
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)
