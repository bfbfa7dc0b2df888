"""The known-answer problem generators of jbilevel.problems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbilevel import objectives, problems, weights


def test_least_squares_rules_and_split(x64):
    p = problems.least_squares(3, n_useful=30, n_useless=10, n_val=20, dim=5, noise=0.0,
                               val_noise=0.0)
    x, y = p.train["x"], p.train["y"]
    assert x.shape == (40, 5) and p.useless_N.sum() == 10
    np.testing.assert_allclose(y[~p.useless_N], x[~p.useless_N] @ p.w_true, atol=1e-12)
    assert np.all(np.abs(y[p.useless_N] - x[p.useless_N] @ p.w_true) > 1e-3)
    np.testing.assert_allclose(p.val["y"], p.val["x"] @ p.w_true, atol=1e-12)
    np.testing.assert_array_equal(p.train["ids"], np.arange(40))
    # noise_labels draws labels independent of x.
    q = problems.least_squares(3, n_useful=30, n_useless=10, dim=5, useless="noise_labels")
    assert q.useless_N.sum() == 10
    with pytest.raises(ValueError, match="useless must be one of"):
        problems.least_squares(useless="flipped")


def test_ridge_solution_is_the_inner_minimiser(x64):
    p = problems.least_squares(0, n_useful=20, n_useless=8, dim=6)
    train = jax.tree.map(jnp.asarray, p.train)
    omega_N = jnp.asarray(np.random.default_rng(0).normal(size=28))
    mu = 1e-2
    theta_D = problems.ridge_solution(weights.weights(omega_N), train, mu)
    inner = objectives.inner_objective(problems.square_loss, weighting="softmax", mu=mu)
    grad_D = jax.grad(inner)(theta_D, omega_N, train)
    assert float(jnp.linalg.norm(grad_D)) < 1e-12
    # Clean weights: zero on useless rows, mean weight 1; with no noise they recover w_true.
    s_N = problems.clean_weights(p.useless_N)
    assert s_N[p.useless_N].sum() == 0 and abs(s_N.mean() - 1) < 1e-12
    exact = problems.least_squares(0, n_useful=20, n_useless=8, dim=6, noise=0.0)
    theta_D = problems.ridge_solution(jnp.asarray(s_N), jax.tree.map(jnp.asarray, exact.train),
                                      1e-10)
    np.testing.assert_allclose(np.asarray(theta_D), exact.w_true, atol=1e-7)


def test_shift_sequences_layout_and_rules():
    train, val, test, corrupt_N = problems.shift_sequences(1, n=20, n_val=6, n_test=4,
                                                           corrupt_frac=0.25, prompt_len=3)
    assert corrupt_N.sum() == 5 and train["input_ids"].shape == (20, 7)
    assert val["labels"].shape == (6, 7) and test["ids"].tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(train["loss_mask"][0], [0, 0, 0, 0, 1, 1, 1])
    prompt = train["input_ids"][:, 1:4]
    answer = train["labels"][:, 4:]
    assert np.all(train["input_ids"][:, 0] == problems.BOS)
    assert np.all(train["input_ids"][:, 4] == problems.SEP)
    np.testing.assert_array_equal(answer[~corrupt_N], (prompt[~corrupt_N] + 1) % 10)
    np.testing.assert_array_equal(answer[corrupt_N], (prompt[corrupt_N] + 5) % 10)
    np.testing.assert_array_equal(val["labels"][:, 4:], (val["input_ids"][:, 1:4] + 1) % 10)
    with pytest.raises(ValueError, match="shift != wrong_shift"):
        problems.shift_sequences(shift=2, wrong_shift=12)
