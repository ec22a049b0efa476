"""Accuracy and confusion matrix of a finished classification job (CSV always, PNG with matplotlib)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


def confusion_matrix(pairs: Iterable[tuple[np.ndarray, np.ndarray]], n_classes: int) -> np.ndarray:
    """int64 [n_classes, n_classes]: rows = true class, columns = predicted; from chunks of
    (true, predicted) label arrays."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    for true, predicted in pairs:
        np.add.at(matrix, (true, predicted), 1)
    return matrix


def accuracy(matrix: np.ndarray) -> float:
    total = int(matrix.sum())
    return float(np.trace(matrix)) / total if total else 0.0


def confusion_csv(matrix: np.ndarray, names: Sequence[str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true \\ predicted", *names])
    for name, row in zip(names, matrix):
        writer.writerow([name, *row.tolist()])
    return out.getvalue().encode()


def confusion_png(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> str | None:
    """Write the confusion matrix as a PNG; return None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'onnx-v2-serving[batch]')"
    n = len(names)
    row_totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, row_totals, out=np.zeros(matrix.shape, dtype=float), where=row_totals > 0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.7 * n), dpi=100)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return None
