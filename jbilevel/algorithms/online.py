"""Online self-refining generation on top of bmo or bds (docs/design.md, The math).

Offline selection drops a bad response together with its question; online generation keeps the
question and regenerates. Every ``every`` steps the host loop (``refresh.Refresher``) picks
questions (a random fraction, or the lowest-weighted ones: "dynamic"), samples ``G`` responses
per question from the current model (theta, or LoRA adapters over the frozen base, unmerged)
through the KV-cache sampler and stores tokens, the sampling log-probs and the source question
id in a fixed-shape :class:`Buffer` held in ``TrainState.online`` (so checkpoints carry it
and a resume is exact). Each train step draws
``batch_size`` buffer rows and trains on them with a stop-gradient importance ratio between
the current and the sampling model (per token or per sequence, clipped above, sampling
log-probs floored) times the source question's weight ``s_i(omega)``:

    l_gen_g = sum_t m_gt sg(r_gt) nll_gt / sum_t m_gt
    theta loss (data part) = (1 - gen_weight) mean_b s_b l_b + gen_weight mean_g s_{q_g} l_gen_g

Generated rows carry the source question's id, so the omega gradients of bmo and the implicit
hypergradient of bds see them through ``s(omega)[ids]`` like offline rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import losses
from jbilevel import sharding as sh
from jbilevel.adjoint import RowGroups, if_any_valid
from jbilevel.algorithms.offline import (
    MethodConfig,
    Steps,
    TrainState,
    block_scales,
    hessian_sample,
    length_blocked,
    make_steps,
    sample_blocks,
    sampled_range,
)
from jbilevel.objectives import ExampleLoss, token_nll_fn

BASES = ("bmo", "bds")


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """Online self-refining generation; off unless ``every > 0`` (then method is bmo or bds)."""

    every: int = 0  # T: steps between buffer refreshes (0 = online generation off)
    start: int = 0  # step of the first refresh (train offline only until the model can answer)
    select: Literal["random", "dynamic"] = "dynamic"  # refresh a random r, or the lowest-weighted
    fraction: float = 0.1  # r: fraction of the training questions refreshed each time
    num_samples: int = 4  # G: responses sampled per refreshed question
    temperature: float = 1.0  # tau: sampling temperature
    top_p: float = 1.0  # nucleus sampling mass (1 = off)
    max_new_tokens: int = 0  # sampled tokens per response (0: longest training response + eos)
    ratio: Literal["per_token", "per_sequence"] = "per_token"  # importance-ratio granularity
    clip: float = 2.0  # importance ratios are clipped above at this value
    floor: float = -10.0  # sampling log-probs are floored at this value in the ratio
    denominator: Literal["model", "sampler"] = "model"  # sampling log-prob: untempered theta_old
    # ("model": ratio 1 until theta moves) or the tempered/top-p law actually sampled ("sampler")
    batch_size: int = 32  # generated rows drawn from the buffer per train step
    gen_weight: float = 0.5  # share of the theta data loss on generated pairs (rest: offline)
    generate_batch_size: int = 0  # prompts per sampler call (0: all selected questions at once)
    # gather the weights over fsdp once per sampler call (False: keep them split, for a model
    # that does not fit one device; each decoded token then gathers them again, a layer at a
    # time); the final evaluation's greedy decoding follows it too
    gather_params: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"every={self.every} must be >= 0 (0 turns online generation off)")
        if self.start < 0:
            raise ValueError(f"start={self.start} must be >= 0")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction={self.fraction} must be in (0, 1]")
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.clip <= 0:
            raise ValueError(f"clip={self.clip} must be > 0 (ratios are clipped above at it)")
        if not 0.0 <= self.gen_weight <= 1.0:
            raise ValueError(f"gen_weight={self.gen_weight} must be in [0, 1]")
        for name in ("max_new_tokens", "generate_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.every > 0


@flax.struct.dataclass
class Buffer:
    """The latest refresh's generated pairs, R rows of length L = prompt P + new tokens T.

    Rows are prompt then response, real tokens first (right padding), laid out like a training
    batch: ``labels`` is ``input_ids`` shifted left, ``loss_mask`` marks generated tokens
    (through the first eos), ``logp`` holds the sampling log-prob of each label (0 off the
    mask).
    """

    input_ids: jax.Array  # int32 RxL
    attention_mask: jax.Array  # int32 RxL
    labels: jax.Array  # int32 RxL
    loss_mask: jax.Array  # float32 RxL
    logp: jax.Array  # float32 RxL: sampling log-probs (see OnlineConfig.denominator)
    ids: jax.Array  # int32 R: source question id (indexes omega)
    valid: jax.Array  # float32 R: 1 for a generated row, 0 for an empty slot
    born: jax.Array  # int32 scalar: step of the refresh that wrote the rows (-1: never)

    def batch(self) -> dict:
        """The rows as a batch dict (what the generated-pair loss reads)."""
        return {k: getattr(self, k) for k in
                ("input_ids", "attention_mask", "labels", "loss_mask", "logp", "ids", "valid")}


def init_buffer(capacity: int, length: int) -> Buffer:
    """An empty buffer (every row invalid) of ``capacity`` rows of ``length`` tokens."""
    zeros = jnp.zeros((capacity, length), jnp.int32)
    return Buffer(input_ids=zeros, attention_mask=zeros, labels=zeros,
                  loss_mask=jnp.zeros((capacity, length), jnp.float32),
                  logp=jnp.zeros((capacity, length), jnp.float32),
                  ids=jnp.zeros((capacity,), jnp.int32), valid=jnp.zeros((capacity,), jnp.float32),
                  born=jnp.full((), -1, jnp.int32))


def buffer_shardings(mesh, rules: sh.AxisRules, shapes: Buffer) -> Buffer:
    """Buffer rows split over the data axes like a batch; ``born`` replicated."""
    return jax.tree.map(
        lambda x: sh.batch_sharding(mesh, rules, x.ndim) if x.ndim else sh.replicated(mesh),
        shapes)


def importance_ratio(logp_cur_BxL, logp_samp_BxL, mask_BxL, *, kind: str, clip: float,
                     floor: float) -> tuple[jax.Array, jax.Array]:
    """Stop-gradient importance ratio between the current and the sampling model.

    Args:
      logp_cur_BxL: log-probs of the generated tokens under the current theta.
      logp_samp_BxL: the stored sampling log-probs; floored at ``floor`` first.
      mask_BxL: 1 on generated tokens.
      kind: "per_token": ``r_t = exp(lc_t - max(ls_t, floor))``; "per_sequence":
        ``r = exp(sum_t m_t (lc_t - max(ls_t, floor)))`` broadcast over the row's tokens.
      clip: ratios are clipped above at ``clip`` (in log space, so no overflow).
    Returns:
      ``(ratio_BxL, clipped_BxL)``: the ratio (0 off the mask, no gradient) and where the
      clip was active (per row for per_sequence, broadcast like the ratio).
    """
    mask = mask_BxL > 0
    log_r = jax.lax.stop_gradient(logp_cur_BxL) - jnp.maximum(logp_samp_BxL, floor)
    log_r = jnp.where(mask, log_r, 0.0)
    if kind == "per_sequence":
        log_r = jnp.broadcast_to(jnp.sum(log_r, axis=-1, keepdims=True), log_r.shape)
    elif kind != "per_token":
        raise ValueError(f"ratio kind {kind!r}: use 'per_token' or 'per_sequence'")
    log_clip = math.log(clip)
    ratio = jnp.where(mask, jnp.exp(jnp.minimum(log_r, log_clip)), 0.0)
    return ratio, mask & (log_r > log_clip)


def token_logprobs(model, theta, batch: dict, base=None) -> jax.Array:
    """``log p_theta(labels_t | prefix)`` for every position (float32 BxL).

    ``model``: a ``jbilevel.models.Model`` (chunked output projection) or a logits forward
    (see ``objectives.token_nll_fn``). With ``base``, ``theta`` is LoRA adapters over those
    params (unmerged, as training computes them).
    """
    params, lora = (theta, None) if base is None else (base, theta)
    return -token_nll_fn(model)(params, batch["input_ids"], batch["labels"],
                                attention_mask=batch["attention_mask"], lora=lora)


def ratio_weighted_nll(nll_BxL, ratio_BxL, mask_BxL) -> jax.Array:
    """``loss_B = sum_t m_t r_t nll_t / sum_t m_t``: the mean token NLL with ratio weights."""
    mask = mask_BxL.astype(jnp.float32)
    total_B = jnp.sum(jnp.where(mask > 0, nll_BxL, 0.0) * ratio_BxL * mask, axis=-1)
    count_B = jnp.sum(mask, axis=-1)
    return total_B / jnp.where(count_B > 0, count_B, 1.0)


def _unbound(loss):
    """A ``(theta, base, rows)`` loss as ``(theta, rows)``, base None: full fine-tuning."""
    return lambda theta, rows: loss(theta, None, rows)


def _generated_loss(model):
    def loss(theta, base, gen: dict) -> jax.Array:
        nll_BxL = -token_logprobs(model, theta, gen, base)
        return ratio_weighted_nll(nll_BxL, gen["ratio"], gen["loss_mask"])

    return loss


def generated_loss(model, *, frozen: bool = False):
    """Per-row ratio-weighted NLL of generated rows (a batch carrying ``ratio``):
    ``(theta, gen) -> loss_R``, or with ``frozen`` ``(adapters, base, gen) -> loss_R``
    (LoRA, the signature of ``make_steps(frozen=True)``)."""
    loss = _generated_loss(model)
    return loss if frozen else _unbound(loss)


def online_example_loss(example_loss, model, *, frozen: bool = False):
    """Per-row loss of a batch that may mix offline and generated rows.

    A plain batch goes to ``example_loss``. A batch from :func:`combine` (keys ``offline``,
    ``generated``, ``ids``, ``valid``, ``scale``) gives ``concat(offline losses, generated
    ratio-weighted losses) * scale``, one per row of ``ids``, so the weighted objectives and
    the hypergradient treat generated rows like examples of their source question. With
    ``frozen`` every loss takes ``(adapters, base, batch)`` (LoRA).
    """
    gen_loss = _generated_loss(model)
    offline = example_loss if frozen else (lambda theta, _, batch: example_loss(theta, batch))

    def loss(theta, base, batch: dict) -> jax.Array:
        if "generated" not in batch:
            return offline(theta, base, batch)
        off_B = offline(theta, base, batch["offline"])
        gen_B = gen_loss(theta, base, batch["generated"])
        return jnp.concatenate([off_B, gen_B]) * batch["scale"]

    return loss if frozen else _unbound(loss)


def hyper_rows(example_loss, model, method: MethodConfig, gen_weight: float, *,
               frozen: bool = False, blocks=None, scales=None):
    """Online bds's rows for the hypergradient of a :func:`combine` batch (for
    ``make_steps(hyper_rows=)``; with ``frozen`` the losses take ``(adapters, base, rows)``,
    which ``make_steps(frozen=True)`` binds). ``blocks``: the offline rows sorted by length,
    each block's u taken at its length, with its scale of ``scales`` (as
    ``offline_hyper_rows(blocks=, scales=)``); generated rows in blocks of their own widths
    (:func:`hyper_buffer`) take theirs each at its width.

    The Hessian is estimated on ``method.hessian_rows`` offline rows and as many generated
    rows, combined with the same ``gen_weight`` (a ``jbilevel.adjoint.RowGroups``: one
    product per group, each with its own loss); ``u = <grad l, v>`` is taken for every
    offline row (with the offline loss) and every generated row (with the ratio-weighted
    loss), each scaled as in the combined batch. The generated rows' products and u are
    skipped while none of them is valid (before the first refresh). With
    ``hessian_rows == 0`` the result equals ``jbilevel.hypergrad`` on the combined batch.
    """
    loss = _generated_loss(model)

    def skipping(theta, base, gen: dict):  # u's pass skips a buffer with no valid row
        return if_any_valid(gen["valid"], loss, theta, base, gen)

    gen_loss, gen_loss_skipping = (loss, skipping) if frozen else (_unbound(loss),
                                                                   _unbound(skipping))

    def split(_, batch: dict):
        off, gens = batch["offline"], _blocks_of(batch["generated"])
        n_off, ways = off["ids"].shape[0], sh.batch_ways()
        # the Hessian: a product per group, the generated rows' skipped while none is valid
        hessian = row_groups(example_loss, gen_loss, hessian_sample(off, method),
                             hessian_blocks(gens, method, ways), gen_weight,
                             blocks=sample_blocks(n_off, method, blocks, ways))
        # the scale is one value per group (combine), so it multiplies u after the chunking;
        # offline rows sorted by length take their u in blocks cut to their lengths, and so
        # do generated rows drawn from the buffer's length buckets
        return hessian, [*((example_loss, rows, batch["scale"][0] * scale) for rows, scale in
                           zip(length_blocked(off, blocks), block_scales(blocks, scales),
                               strict=True)),
                         *((gen_loss_skipping, gen, batch["scale"][n_off]) for gen in gens)]

    return split


def row_groups(example_loss: ExampleLoss, gen_loss: ExampleLoss, offline: dict,
               generated, gen_weight: float, blocks=None) -> RowGroups:
    """Offline and generated rows as two groups, each with its own loss and scaled as
    :func:`combine` scales them; the generated rows' passes skippable (none of them is valid
    before the first refresh). ``blocks``: the offline rows sorted by length, a group per
    block cut to its length (the same sum); ``generated``: a batch, or a tuple of batches
    at their own widths (length buckets), a group each."""
    gens = _blocks_of(generated)
    s_off, s_gen = group_scales(offline["valid"], _valid(gens), gen_weight)
    return RowGroups((*((example_loss, rows, s_off, False)
                        for rows in length_blocked(offline, blocks)),
                      *((gen_loss, gen, s_gen, True) for gen in gens)))


def _blocks_of(generated) -> tuple[dict, ...]:
    """Generated rows as a tuple of batches (one batch: a tuple of one)."""
    return tuple(generated) if isinstance(generated, (tuple, list)) else (generated,)


def _valid(gens: tuple[dict, ...]) -> jax.Array:
    return jnp.concatenate([g["valid"].astype(jnp.float32) for g in gens])


def hessian_blocks(gens: tuple[dict, ...], method: MethodConfig, ways: int = 1
                   ) -> tuple[dict, ...]:
    """:func:`~jbilevel.algorithms.offline.hessian_sample` of generated rows held in blocks
    at their own widths (increasing): the rows that sample takes from the blocks laid end to
    end, each block's share at its own width (the strided rows of one batch of them all).
    A block whose rows do not split evenly over ``ways`` devices joins the next wider ones,
    padded to their width, until they do (``jbilevel.data.batching.even_blocks``)."""
    n = sum(g["ids"].shape[0] for g in gens)
    if not method.hessian_rows or method.hessian_rows >= n:
        return _even_groups(gens, ways)
    stride, start, out = n // method.hessian_rows, 0, []
    for gen in gens:
        end = start + gen["ids"].shape[0]
        first, stop = sampled_range(start, end, n, method.hessian_rows)
        if stop > first:  # the sample's rows first..stop-1 lie in this block
            rows = slice(first * stride - start, (stop - 1) * stride - start + 1, stride)
            out.append(jax.tree.map(lambda x, rows=rows: x[rows], gen))
        start = end
    return _even_groups(tuple(out), ways)


def _even_groups(gens: tuple[dict, ...], ways: int) -> tuple[dict, ...]:
    """Blocks of increasing widths, each one whose rows do not split over ``ways`` joined
    with the next until they do, the rows right-padded to the widest (padding tokens: no
    loss, no attention)."""
    out, pending = [], []
    for gen in gens:
        pending.append(gen)
        if sum(g["ids"].shape[0] for g in pending) % ways == 0:
            out.append(_padded_concat(pending))
            pending = []
    if pending:
        out.append(_padded_concat(pending))
    return tuple(out)


def _padded_concat(gens: list[dict]) -> dict:
    if len(gens) == 1:
        return gens[0]
    width = max(g["input_ids"].shape[1] for g in gens)
    return jax.tree.map(lambda *xs: jnp.concatenate([
        jnp.pad(x, ((0, 0), (0, width - x.shape[1]))) if x.ndim == 2 else x for x in xs]),
        *gens)


def group_scales(valid_off, valid_gen, gen_weight: float):
    """The scales on the offline and on the generated rows' losses (scalars) under which the
    valid-row mean of both is ``(1 - gen_weight) mean_offline + gen_weight mean_generated``;
    while no row is valid among the generated ones, 1 on the offline rows (their mean alone)
    and a scale the generated rows' zero weight never uses."""
    n_off = jnp.sum(valid_off.astype(jnp.float32))
    n_gen = jnp.sum(valid_gen.astype(jnp.float32))
    n = n_off + n_gen
    scale_off = jnp.where(n_gen > 0, (1.0 - gen_weight) * n / jnp.maximum(n_off, 1.0), 1.0)
    return scale_off, gen_weight * n / jnp.maximum(n_gen, 1.0)


def combine(offline: dict, generated, gen_weight: float) -> dict:
    """One batch of offline and generated rows whose valid-row mean is
    ``(1 - gen_weight) mean_offline + gen_weight mean_generated`` (all offline if none is
    generated). ``generated``: a batch, or a tuple of batches at their own widths (the
    rows of each length bucket), kept as given; ``ids``, ``valid`` and ``scale`` run over
    the offline rows, then the generated ones in order."""
    gens = _blocks_of(generated)
    v_off, v_gen = offline["valid"].astype(jnp.float32), _valid(gens)
    scale_off, scale_gen = group_scales(v_off, v_gen, gen_weight)
    scale = jnp.concatenate([jnp.broadcast_to(scale_off, v_off.shape),
                             jnp.broadcast_to(scale_gen, v_gen.shape)])
    ids = jnp.concatenate([offline["ids"], *(g["ids"] for g in gens)]).astype(jnp.int32)
    return {"offline": offline, "generated": generated, "ids": ids,
            "valid": jnp.concatenate([v_off, v_gen]), "scale": scale}


def draw(buffer: Buffer, key, n: int, span: tuple[int, int] | None = None) -> dict:
    """``n`` distinct buffer rows, uniformly among the valid ones (invalid only if too few).

    ``span`` = (shorter, width): among the valid rows longer than ``shorter`` tokens and at
    most ``width`` long, cut to ``width`` tokens (the rows are right-padded, so a cut row is
    the same row: :func:`generated_buckets`). A drawn row outside the span, possible only
    where it holds fewer than ``n`` rows, is marked invalid.
    """
    rows = buffer.batch()
    valid_R = buffer.valid
    if span is not None:
        shorter, width = span
        length_R = jnp.sum(buffer.attention_mask, axis=-1)
        valid_R = valid_R * ((length_R > shorter) & (length_R <= width))
        rows = {k: v[:, :width] if v.ndim == 2 else v for k, v in rows.items()}
        rows["valid"] = valid_R
    total = jnp.sum(valid_R)
    p_R = jnp.where(total > 0, valid_R / jnp.maximum(total, 1.0), 1.0 / valid_R.shape[0])
    idx = jax.random.choice(key, valid_R.shape[0], (n,), replace=False, p=p_R)
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), rows)


def generated_buckets(length_N: np.ndarray, buckets: int, top: int, capacity: int,
                      min_rows: int, multiple: int = 64) -> tuple[tuple[int, int, int], ...]:
    """The length buckets of the buffer's generated rows (``data.length_buckets`` > 1), fixed
    for the whole run so that a refresh compiles nothing new: ``(shorter, width, rows)``, the
    rows longer than ``shorter`` and at most ``width`` tokens, increasing, ``rows`` how many of
    a full buffer of ``capacity`` rows the bucket holds if the generated rows are as long as
    ``length_N``.

    ``length_N``: what the training rows would be as buffer rows (their prompt and their
    response, at most ``max_new_tokens`` of it): a run knows them before it generates
    anything. The widths are its quantiles rounded up to ``multiple``
    (:func:`jbilevel.data.batching.length_buckets`), the last one ``top`` (the buffer's width),
    so that every generated row lies in one bucket whatever its length; a bucket expected to
    hold fewer than ``min_rows`` rows (a train step's draw) joins the next wider one, the last
    one the one before it. One bucket: ``((0, top, capacity),)``.
    """
    from jbilevel.data.batching import length_buckets, strata_counts

    length_N = np.minimum(np.asarray(length_N), top)
    if buckets <= 1 or not length_N.size:
        return ((0, top, capacity),)
    widths = length_buckets(length_N, buckets, multiple, top=top)
    expected = strata_counts(np.bincount(np.searchsorted(widths, length_N),
                                         minlength=len(widths)), capacity, at_least_one=False)
    spans, shorter, rows = [], 0, 0
    for width, count in zip(widths, expected, strict=True):
        rows += int(count)
        if rows >= min_rows:
            spans.append((shorter, int(width), rows))
            shorter, rows = int(width), 0
    if spans and spans[-1][1] < top:  # the widest rows, too few for a draw of their own
        before, _, more = spans.pop()
        spans.append((before, top, more + rows))
    return tuple(spans) or ((0, top, capacity),)


def generated_spans(length_R: np.ndarray, buckets: tuple[tuple[int, int, int], ...]
                    ) -> tuple[tuple[int, int, int], ...]:
    """The buffer's valid rows per bucket of :func:`generated_buckets`: ``(shorter, width,
    rows)`` with ``rows`` how many of the rows of lengths ``length_R`` it holds (0 for an
    empty one, which a train step never draws from)."""
    length_R = np.asarray(length_R)
    return tuple((shorter, width, int(np.sum((length_R > shorter) & (length_R <= width))))
                 for shorter, width, _ in buckets)


def hyper_buffer_rows(capacity: int, hyper_rows: int, n_train: int, ways: int = 1) -> int:
    """How many buffer rows a bds hypergradient takes: all of them when its hyper batch holds
    every training row, else the same share of the buffer, rounded up to a multiple of
    ``ways`` (the data-parallel split, so every device gets as many rows), so that the
    generated rows' term costs what the offline rows' does, not a pass over the whole buffer
    (fraction x N x num_samples rows)."""
    if hyper_rows >= n_train:
        return capacity
    share = math.ceil(capacity * hyper_rows / n_train)
    return min(capacity, max(ways, -(-share // ways) * ways))


def hyper_buffer(buffer: Buffer, key, hyper_rows: int, n_train: int,
                 blocks: tuple[tuple[int, int, int], ...] | None = None
                 ) -> dict | tuple:
    """The buffer rows of a hypergradient over ``hyper_rows`` of the ``n_train`` training rows:
    the whole buffer, or a uniform draw of :func:`hyper_buffer_rows` valid rows (``key``),
    as many per device inside a sharded step.

    ``blocks`` (:func:`generated_strata`, ``(shorter, width, rows)`` each): instead, a
    tuple of batches, block ``j`` that many distinct rows of its length bucket (every one of
    them where it asks for all, the rest marked invalid), cut to its width.
    """
    if blocks is not None:
        return tuple(draw(buffer, jax.random.fold_in(key, j), rows, (shorter, width))
                     for j, (shorter, width, rows) in enumerate(blocks))
    capacity = buffer.valid.shape[0]
    n = hyper_buffer_rows(capacity, hyper_rows, n_train, sh.batch_ways())
    return buffer.batch() if n == capacity else draw(buffer, key, n)


def generated_strata(spans: tuple[tuple[int, int, int], ...], rows: int, ways: int = 1
                     ) -> tuple[tuple[int, int, int], ...]:
    """The buffer rows a bds hypergradient takes from each length bucket: ``(shorter, width,
    n)`` per bucket of ``spans`` (``(shorter, width, rows)`` each: the buffer's rows, or the
    rows a full buffer is expected to hold, :func:`generated_buckets`), each bucket's rows
    then taking their terms at its width, as the offline rows' ``length_strata`` do.

    Every row of each bucket where ``rows`` (:func:`hyper_buffer_rows`, a multiple of
    ``ways``) is at least the buckets' rows; else a share of ``rows`` in proportion to
    its rows (largest remainders, ``jbilevel.data.batching.strata_counts``) in whole
    multiples of ``ways`` (the data-parallel devices, so that each block splits evenly over
    them: ``jbilevel.data.batching.even_blocks``), at least one each: with more buckets than
    ``rows / ways`` the one of fewest rows joins its wider neighbour (its rows then at the
    wider width; the widest bucket takes the one before it), as ``length_strata`` does. ``n`` is
    rounded up to a multiple of ``ways`` (rows past a bucket's are drawn invalid). The scale
    that makes up for a share out of proportion depends on the rows the buffer holds, so the
    step computes it (:func:`strata_scales`) and one program serves every refresh.
    """
    from jbilevel.data.batching import strata_counts

    spans = list(spans)
    sizes = np.array([n for *_, n in spans], np.int64)
    if rows >= sizes.sum():
        counts = sizes
    else:
        while len(spans) > max(1, rows // ways):  # too few rows for one block each: the
            # bucket of fewest rows joins its wider neighbour (the widest: the one before it
            # joins it), as length_strata joins the offline rows' buckets
            i = int(np.argmin([n for *_, n in spans]))
            i = min(i, len(spans) - 2)
            (shorter, _, a), (_, width, b) = spans[i], spans[i + 1]
            spans[i:i + 2] = [(shorter, width, a + b)]
        sizes = np.array([n for *_, n in spans], np.int64)
        counts = np.minimum(strata_counts(sizes, rows // ways) * ways, sizes)
    return tuple((shorter, width, -(-int(n) // ways) * ways)
                 for (shorter, width, _), n in zip(spans, counts, strict=True) if n > 0)


def strata_scales(buffer: Buffer, blocks: tuple[tuple[int, int, int], ...],
                  gens: tuple[dict, ...]) -> jax.Array:
    """The scale on each block's rows (:func:`generated_strata`, drawn as ``gens``) under
    which they estimate the buffer's valid rows alike: the bucket's share of those rows over
    its share of the rows drawn (1 in proportion, and 1 where every row is drawn), so that a
    row of a bucket drawn with probability ``m_j / n_j`` counts ``m / n`` times on average, as
    in a uniform draw; 0 for a block with no valid row."""
    length_R = jnp.sum(buffer.attention_mask, axis=-1)
    size = jnp.stack([jnp.sum(buffer.valid * ((length_R > shorter) & (length_R <= width)))
                      for shorter, width, _ in blocks]).astype(jnp.float32)
    taken = jnp.stack([jnp.sum(g["valid"]) for g in gens]).astype(jnp.float32)
    return jnp.where(taken > 0, size * jnp.sum(taken)
                     / jnp.maximum(jnp.sum(size) * taken, 1.0), 0.0)


def make_online_steps(example_loss, model, method: MethodConfig,
                      cfg: OnlineConfig, *, seed: int = 0, frozen: bool = False,
                      hyper_blocks=None, hyper_scales=None) -> Steps:
    """bmo/bds steps that also train on the generated pairs in ``state.online``.

    Args:
      example_loss: offline per-example loss ``(theta, batch) -> loss_B``, or with
        ``frozen`` ``(adapters, base, batch) -> loss_B`` (``objectives.lm_lora_example_loss``).
      model: the same model: a ``jbilevel.models.Model`` or its logits forward.
      method: bmo or bds settings.
      cfg: online settings.
      seed: the per-step draws of buffer rows use keys folded from it and the step
        (resumable).
      frozen: theta is LoRA adapters over ``state.frozen`` (as ``make_steps(frozen=True)``):
        the importance ratios and the generated rows' losses run the base through the
        adapters, unmerged.
      hyper_blocks: bds with length buckets: the offline rows' blocks (over every training
        row sorted by length, ``jbilevel.data.batching.length_blocks``, or a sample of a fixed
        number of rows from each bucket, ``length_strata``), each one's u taken at its length.
      hyper_scales: a scale per block on its u (``jbilevel.data.batching.stratum_scales``).
    Returns:
      ``Steps`` with the signatures of ``make_steps(method)``; train metrics add
      ``online_ratio_mean`` / ``online_clipped`` (fractions over tokens, or rows for
      per_sequence) and ``online_gen_loss`` (mean NLL of the drawn generated rows).
      ``train`` takes a last, static argument ``gen_span=(shorter, width)``: the step's
      generated rows drawn from that length bucket and cut to its width
      (:func:`generated_buckets`; default: every valid row at the buffer's width).
      ``train_offline`` is the offline step, for the steps before the first refresh. bds's
      hypergradient takes the whole buffer when its hyper batch is every training row, else
      a draw of the same share of the buffer (:func:`hyper_buffer_rows`); it takes a last,
      static argument ``gen_blocks``: those rows taken from the buffer's length buckets, each
      bucket's cut to its width (:func:`generated_strata`; default: at the buffer's width).
    """
    if method.method not in BASES:
        raise ValueError(f"online generation runs on top of {BASES}, not method "
                         f"{method.method!r}; set method.method to bmo or bds")
    # bds: the hypergradient over the hyper batch and the buffer (or a draw from it)
    steps = make_steps(online_example_loss(example_loss, model, frozen=frozen), method,
                       frozen=frozen, hyper_rows=hyper_rows(example_loss, model, method,
                                                            cfg.gen_weight, frozen=frozen,
                                                            blocks=hyper_blocks,
                                                            scales=hyper_scales))
    draw_key = jax.random.fold_in(jax.random.key(seed), 1)
    hyper_key = jax.random.fold_in(jax.random.key(seed), 2)

    def with_ratios(state: TrainState, gen: dict):
        # a separate no-grad forward: the ratio enters the loss as data (stop-gradient, also
        # inside the hypergradient) and its statistics become metrics
        logp_cur = if_any_valid(gen["valid"],
                                lambda th, g, b: token_logprobs(model, th, g, b),
                                jax.lax.stop_gradient(state.theta), gen, state.frozen)
        ratio, clipped = importance_ratio(logp_cur, gen["logp"], gen["loss_mask"],
                                          kind=cfg.ratio, clip=cfg.clip, floor=cfg.floor)
        mask = gen["loss_mask"] * gen["valid"][:, None]
        if cfg.ratio == "per_sequence":  # one ratio per row
            mask = gen["valid"] * (jnp.sum(gen["loss_mask"], axis=-1) > 0)
            ratio_s, clipped_s = ratio.max(axis=-1), clipped.any(axis=-1)
        else:
            ratio_s, clipped_s = ratio, clipped
        count = jnp.maximum(jnp.sum(mask), 1.0)
        nll_B = ratio_weighted_nll(-logp_cur, jnp.ones_like(ratio), gen["loss_mask"])
        stats = {"online_ratio_mean": jnp.sum(ratio_s * mask) / count,
                 "online_clipped": jnp.sum(clipped_s * mask) / count,
                 "online_gen_loss": losses.weighted_mean(nll_B, jnp.ones_like(nll_B),
                                                         gen["valid"]),
                 # the generated rows' tokens (padding and invalid rows left out)
                 "online_tokens": jnp.sum(gen["attention_mask"] * gen["valid"][:, None])}
        return {**gen, "ratio": ratio}, stats

    gen_loss = generated_loss(model, frozen=frozen)

    def with_generated(state: TrainState, batch: dict, gen_span):
        """The step's offline rows and a draw of generated ones, as two groups: the train
        step takes one reverse pass per group (so it holds one group's activations at a
        time) and skips the generated rows' while none of them is valid."""
        key = jax.random.fold_in(draw_key, state.step)
        gen, stats = with_ratios(state, draw(state.online, key, cfg.batch_size, gen_span))
        return row_groups(example_loss, gen_loss, batch, gen, cfg.gen_weight), stats

    # gen_span (static): the length bucket the step draws its generated rows from, cut to its
    # width (None: every valid row, at the buffer's width)
    def bmo_train(state: TrainState, batch: dict, val_batch: dict, gen_span=None):
        rows, stats = with_generated(state, batch, gen_span)
        state, metrics = steps.train(state, rows, val_batch)
        return state, {**metrics, **stats}

    def bds_train(state: TrainState, batch: dict, gen_span=None):
        rows, stats = with_generated(state, batch, gen_span)
        state, metrics = steps.train(state, rows)
        return state, {**metrics, **stats}

    # gen_blocks (static): the buffer rows taken from each length bucket, each cut to its
    # width (None: at the buffer's width)
    def bds_hyper(state: TrainState, hyper_batch: dict, val_batch: dict, gen_blocks=None):
        rows = hyper_buffer(state.online, jax.random.fold_in(hyper_key, state.step),
                            hyper_batch["ids"].shape[0], state.omega.shape[0], gen_blocks)
        gen = tuple(with_ratios(state, r)[0] for r in _blocks_of(rows))
        if gen_blocks is None:
            return steps.hyper(state, combine(hyper_batch, gen[0], cfg.gen_weight), val_batch)
        # a bucket's stratum scale weighs its rows' losses as the importance ratio does:
        # through the per-row term and the Hessian's products alike
        scales = strata_scales(state.online, gen_blocks, gen)
        gen = tuple({**g, "ratio": g["ratio"] * scales[j]} for j, g in enumerate(gen))
        return steps.hyper(state, combine(hyper_batch, gen, cfg.gen_weight), val_batch)

    # steps.train on a plain batch is the offline step: the trainer runs it until the first
    # refresh has filled the buffer (a step on the empty buffer would pay for batch_size
    # generated rows that all weigh 0)
    if method.method == "bmo":
        return Steps(train=bmo_train, evaluate=example_loss, train_offline=steps.train,
                     train_static=1)
    return Steps(train=bds_train, hyper=bds_hyper, evaluate=example_loss,
                 train_offline=steps.train, train_static=1, hyper_static=1)
