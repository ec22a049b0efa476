"""Training reports: metrics JSON and PNG plots (fit line, loss curve, confusion matrix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def write_metrics(directory: Path, metrics: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    return path


def plot_loss(directory: Path, curves: dict[str, list[float]], title: str, ylabel: str, log_y: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=label)
    ax.set(title=title, xlabel="step" if len(next(iter(curves.values()))) > 100 else "epoch", ylabel=ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, directory / "loss.png")


def plot_fit(
    directory: Path, x: np.ndarray, y: np.ndarray, slope: float, intercept: float, xlabel: str, ylabel: str, title: str
) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(x, y, s=12, marker="x", color="tab:red", label="training data")
    xs = np.linspace(x.min(), x.max(), 100)
    ax.plot(xs, slope * xs + intercept, label=f"fit: {slope:.4f}·x {intercept:+.4f}")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, directory / "fit.png")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int = 10) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def plot_confusion(directory: Path, matrix: np.ndarray, class_names: list[str], title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(class_names)), yticks=range(len(class_names)), title=title, xlabel="predicted", ylabel="true"
    )
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    threshold = matrix.max() / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if count > threshold else "black")
    return _save(fig, directory / "confusion.png")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
