"""Small bilevel problems whose answer is known, for convergence experiments and examples.

``least_squares`` builds a weighted-least-squares data-selection problem: ``n_useful``
training examples follow the validation set's rule ``y = x w_true + noise``, ``n_useless``
follow another rule (an independent parameter, or pure-noise labels). The best data weights
are known: all mass on the useful examples; the validation loss of the model fitted to them
alone (``clean_solution``) is the target a data-selection method should reach.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

USELESS_KINDS = ("other_param", "noise_labels")
BOS, SEP = 10, 11  # shift_sequences tokens; digits are 0-9


@dataclasses.dataclass(frozen=True, eq=False)
class LeastSquares:
    """A weighted least-squares selection problem (host numpy arrays, float64).

    Fields:
      train: batch dict: ``x`` (N, D), ``y`` (N,), ``ids`` (N,) = arange, ``valid`` (N,) ones.
      val: clean validation batch dict: ``x`` (M, D), ``y`` (M,), ``valid`` (M,) ones.
      useless_N: True for the training examples that do not follow the validation rule.
      w_true: (D,) the validation rule.
    """

    train: dict
    val: dict
    useless_N: np.ndarray
    w_true: np.ndarray


def least_squares(seed: int = 0, *, n_useful: int = 50, n_useless: int = 50, n_val: int = 50,
                  dim: int = 10, noise: float = 0.1, val_noise: float = 0.1,
                  useless: str = "other_param"
                  ) -> LeastSquares:
    """Draws a problem; useful and useless examples are interleaved in a random order.

    Args:
      seed: numpy seed.
      n_useful, n_useless: training examples following / not following ``w_true``.
      n_val: clean validation examples.
      dim: number of features D.
      noise: standard deviation of the label noise on every training example.
      val_noise: the same for the validation examples.
      useless: "other_param" (labels ``x w_bad + noise``, ``w_bad`` independent of
        ``w_true``) or "noise_labels" (labels pure noise with the useful labels' scale).

    Returns:
      ``LeastSquares``.
    """
    if useless not in USELESS_KINDS:
        raise ValueError(f"least_squares: useless must be one of {USELESS_KINDS}, "
                         f"got {useless!r}")
    if min(n_useful, n_val, dim) < 1 or n_useless < 0 or min(noise, val_noise) < 0:
        raise ValueError(f"least_squares: need n_useful, n_val, dim >= 1, n_useless >= 0 and "
                         f"noises >= 0; got n_useful={n_useful}, n_useless={n_useless}, "
                         f"n_val={n_val}, dim={dim}, noise={noise}, val_noise={val_noise}")
    rng = np.random.default_rng(seed)
    n = n_useful + n_useless
    w_true = rng.normal(size=dim)
    w_bad = rng.normal(size=dim)
    x_NxD = rng.normal(size=(n, dim))
    useless_N = rng.permutation(np.arange(n) < n_useless)
    y_good_N = x_NxD @ w_true
    if useless == "other_param":
        y_bad_N = x_NxD @ w_bad
    else:
        y_bad_N = rng.normal(size=n) * np.linalg.norm(w_true)
    y_N = np.where(useless_N, y_bad_N, y_good_N) + noise * rng.normal(size=n)
    xv_MxD = rng.normal(size=(n_val, dim))
    yv_M = xv_MxD @ w_true + val_noise * rng.normal(size=n_val)
    train = {"x": x_NxD, "y": y_N, "ids": np.arange(n, dtype=np.int32), "valid": np.ones(n)}
    val = {"x": xv_MxD, "y": yv_M, "valid": np.ones(n_val)}
    return LeastSquares(train, val, useless_N, w_true)


def square_loss(theta_D: jax.Array, batch: dict) -> jax.Array:
    """Per-example loss ``0.5 (x_b theta - y_b)^2``, shape (B,)."""
    return 0.5 * (batch["x"] @ theta_D - batch["y"]) ** 2


def ridge_solution(s_B: jax.Array, batch: dict, mu: float) -> jax.Array:
    """Exact minimiser of ``sum_b s_b square_loss_b / B + mu/2 |theta|^2`` (a dense solve).

    This is ``argmin_theta g`` for ``objectives.inner_objective(square_loss, mu=mu)`` with the
    weights ``s_B`` of the batch rows (all rows valid); jittable and differentiable.

    Args:
      s_B: non-negative per-row weights.
      batch: dict with ``x`` (B, D) and ``y`` (B,).
      mu: L2 strength; > 0 keeps the system nonsingular whatever the weights.

    Returns:
      theta_D.
    """
    x_BxD, y_B = batch["x"], batch["y"]
    n = x_BxD.shape[0]
    a_DxD = x_BxD.T @ (s_B[:, None] * x_BxD) / n + mu * jnp.eye(x_BxD.shape[1], dtype=x_BxD.dtype)
    return jnp.linalg.solve(a_DxD, x_BxD.T @ (s_B * y_B) / n)


def clean_weights(useless_N: np.ndarray) -> np.ndarray:
    """The ideal softmax-reachable weights: 0 on useless examples, mean weight 1 overall."""
    useful_N = ~np.asarray(useless_N)
    return useful_N * (useful_N.size / useful_N.sum())


def shift_sequences(seed: int = 0, *, n: int = 512, n_val: int = 64, n_test: int = 256,
                    corrupt_frac: float = 0.4, prompt_len: int = 4, shift: int = 1,
                    wrong_shift: int = 5) -> tuple[dict, dict, dict, np.ndarray]:
    """A synthetic SFT task for a tiny LM: answer each prompt digit plus ``shift`` (mod 10).

    Sequence ``[BOS, p_1..p_K, SEP, r_1..r_K]`` with digits 0-9, ``BOS = 10``, ``SEP = 11``
    (vocabulary 12); ``r_j = (p_j + shift) mod 10`` on clean rows. A ``corrupt_frac``
    fraction of the training rows follows the consistent wrong rule ``p_j + wrong_shift``
    (systematic corruption: uniform mixing learns a blend of the two rules). The validation
    and test rows are clean.

    Args:
      seed: numpy seed.
      n, n_val, n_test: rows in the training, validation and test sets.
      corrupt_frac: fraction of training rows with the wrong rule (rounded down).
      prompt_len: K, digits per prompt and per response.
      shift, wrong_shift: the clean and the wrong rule (must differ mod 10).

    Returns:
      ``(train, val, test, corrupt_N)``: batch dicts of numpy arrays with ``input_ids``,
      ``attention_mask``, ``labels`` (shifted), ``loss_mask`` (1 on response tokens), ``ids``
      (arange) and ``valid``, as ``objectives.lm_example_loss`` reads them; corrupt_N is
      True on the corrupted training rows.
    """
    if not 0 <= corrupt_frac < 1 or (shift - wrong_shift) % 10 == 0 or prompt_len < 1:
        raise ValueError(f"shift_sequences: need 0 <= corrupt_frac < 1, shift != wrong_shift "
                         f"(mod 10) and prompt_len >= 1; got corrupt_frac={corrupt_frac}, "
                         f"shift={shift}, wrong_shift={wrong_shift}, prompt_len={prompt_len}")
    rng = np.random.default_rng(seed)
    corrupt_N = rng.permutation(np.arange(n) < int(corrupt_frac * n))
    train = _shift_rows(rng, np.where(corrupt_N, wrong_shift, shift), prompt_len)
    val = _shift_rows(rng, np.full(n_val, shift), prompt_len)
    test = _shift_rows(rng, np.full(n_test, shift), prompt_len)
    return train, val, test, corrupt_N



def _shift_rows(rng: np.random.Generator, shift_B: np.ndarray, k: int) -> dict:
    b = shift_B.shape[0]
    p_BxK = rng.integers(0, 10, size=(b, k))
    r_BxK = (p_BxK + shift_B[:, None]) % 10
    seq_BxS = np.concatenate([np.full((b, 1), BOS), p_BxK, np.full((b, 1), SEP), r_BxK], axis=1)
    labels_BxL = seq_BxS[:, 1:].astype(np.int32)
    loss_mask_BxL = np.zeros(labels_BxL.shape, np.float32)
    loss_mask_BxL[:, k + 1:] = 1.0  # the labels r_1..r_K
    return {"input_ids": seq_BxS[:, :-1].astype(np.int32),
            "attention_mask": np.ones(labels_BxL.shape, np.int32),
            "labels": labels_BxL, "loss_mask": loss_mask_BxL,
            "ids": np.arange(b, dtype=np.int32), "valid": np.ones(b, np.float32)}
