"""Gradient descent reaches the closed-form least-squares optimum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import data, regression

OPTIMUM_MSE = 8.9539427520  # ex1data1, from SOURCE.md (numpy lstsq, float64)


def test_profit_gd_matches_lstsq() -> None:
    table, _ = data.load_csv("ex1data1.txt")
    x, y = table[:, :1], table[:, 1]
    fit = regression.fit_gradient_descent(x, y, lr=0.1, steps=2000, log_every=0)
    ref = regression.closed_form(x, y)
    assert fit.mse(x, y) == pytest.approx(OPTIMUM_MSE, rel=1e-6)
    assert fit.mse(x, y) == pytest.approx(ref.mse(x, y), rel=1e-9)
    assert fit.weights[0] == pytest.approx(1.1930336442, rel=1e-8)
    assert fit.bias == pytest.approx(-3.8957808783, rel=1e-8)
    assert fit.losses[0] > 3 * fit.losses[-1]  # it really descended from the zero start
    assert all(b <= a + 1e-12 for a, b in zip(fit.losses, fit.losses[1:]))


def test_house_gd_matches_lstsq_with_correlated_features() -> None:
    table, _ = data.load_csv("ex1data2.txt")
    x, y = table[:, :2], table[:, 2]
    fit = regression.fit_gradient_descent(x, y, lr=0.1, steps=3000, log_every=0)
    ref = regression.closed_form(x, y)
    np.testing.assert_allclose(fit.weights, ref.weights, rtol=1e-6)
    assert fit.mse(x, y) == pytest.approx(ref.mse(x, y), rel=1e-9)


def test_gd_on_random_problem() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(5, 3, (200, 3))
    y = x @ np.array([2.0, -1.0, 0.5]) + 4 + rng.normal(0, 0.1, 200)
    fit = regression.fit_gradient_descent(x, y, steps=3000, log_every=0)
    np.testing.assert_allclose(fit.weights, regression.closed_form(x, y).weights, rtol=1e-6)


def test_exported_module_speaks_natural_units() -> None:
    table, _ = data.load_csv("ex1data1.txt")
    fit = regression.fit_gradient_descent(table[:, :1], table[:, 1], log_every=0)
    module = regression.NormalizedLinear(fit, in_scale=[1e-4], out_scale=1e4)
    dollars = module(torch.tensor([[35000.0], [70000.0]])).numpy()[:, 0]
    np.testing.assert_allclose(dollars, [2798.37, 44554.55], atol=1.0)
