"""Linear regression by full-batch gradient descent on the mean squared error.

Features and target are standardised for training (the problem is then well conditioned and
plain gradient descent reaches the closed-form optimum); the exported module folds the
standardisation and the unit conversion into the graph, so it speaks natural units.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LinearFit:
    """Weights and intercept in the data file's units, plus the loss curve (MSE, file units).

    ``scaler`` keeps the standardisation used in training (x mean/std, y mean/std) and the
    weights in standardised space, so the exported graph can normalise explicitly.
    """

    weights: np.ndarray  # [features]
    bias: float
    losses: list[float] = field(default_factory=list)
    scaler: dict[str, np.ndarray | float] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        y: np.ndarray = x @ self.weights + self.bias
        return y

    def mse(self, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean((self.predict(x) - y) ** 2))


def fit_gradient_descent(
    x: np.ndarray, y: np.ndarray, *, lr: float = 0.1, steps: int = 2000, seed: int = 0, log_every: int = 200
) -> LinearFit:
    """Fit ``y ≈ x·w + b`` by full-batch gradient descent on MSE (float64, standardised data)."""
    torch.manual_seed(seed)
    x_mean, x_std = x.mean(axis=0), x.std(axis=0)
    y_mean, y_std = float(y.mean()), float(y.std())
    xs = torch.from_numpy((x - x_mean) / x_std)
    ys = torch.from_numpy((y - y_mean) / y_std)
    layer = nn.Linear(x.shape[1], 1, dtype=torch.float64)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(layer(xs).squeeze(1), ys)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(loss.item() * y_std**2)  # MSE in the file's units
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info("step %5d  mse %.10f", step, losses[-1])
    w_std = layer.weight.detach().numpy()[0]
    b_std = float(layer.bias.detach()[0])
    weights = w_std * y_std / x_std
    bias = y_mean + y_std * b_std - float(weights @ x_mean)
    scaler = {"x_mean": x_mean, "x_std": x_std, "y_mean": y_mean, "y_std": y_std, "w": w_std, "b": b_std}
    return LinearFit(weights=weights, bias=bias, losses=losses, scaler=scaler)


def closed_form(x: np.ndarray, y: np.ndarray) -> LinearFit:
    """Least-squares reference solution (numpy lstsq)."""
    design = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return LinearFit(weights=coef[:-1], bias=float(coef[-1]))


class NormalizedLinear(nn.Module):
    """Natural units in and out: unit conversion, standardisation, linear layer, de-standardisation.

    ``in_scale`` converts each input column into the data file's units (people → 10,000s) and
    ``out_scale`` converts the prediction back (10,000s of dollars → dollars).
    """

    in_scale: torch.Tensor
    x_mean: torch.Tensor
    x_std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor
    out_scale: torch.Tensor

    def __init__(self, fit: LinearFit, in_scale: list[float], out_scale: float):
        super().__init__()
        s = fit.scaler

        def buf(name: str, value: object) -> None:
            self.register_buffer(name, torch.tensor(np.asarray(value, dtype=np.float32)))

        buf("in_scale", in_scale)
        buf("x_mean", s["x_mean"])
        buf("x_std", s["x_std"])
        buf("weight", np.asarray(s["w"])[:, None])
        buf("bias", [s["b"]])
        buf("y_mean", s["y_mean"])
        buf("y_std", s["y_std"])
        buf("out_scale", out_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x * self.in_scale - self.x_mean) / self.x_std
        y = z @ self.weight + self.bias
        return (y * self.y_std + self.y_mean) * self.out_scale
