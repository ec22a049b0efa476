"""Agreement between two versions' answers to the same requests (a primary and its shadow or
canary), per output row.

A classifier's output (float, [N, C] with C > 1) is compared by its argmax (the class each version
picks: agreement) and by the mean absolute difference of its values (mean |Δp|); any other output
(a regression: one or a few values per row) by |Δ| and the relative error |Δ| / |primary| (with a
floor of 1e-6), a row agreeing when its largest |Δ| <= tolerance × |primary| (or 1e-6). Only the
first output of a request is compared (the models here have one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: A relative error's denominator never goes below this, nor an agreement tolerance.
FLOOR = 1e-6


@dataclass
class RowComparison:
    """Per row of a compared batch: agreed, and the row's mean |Δ| and relative error."""

    agreed: np.ndarray  # bool [rows]
    abs_diff: np.ndarray  # float64 [rows]: mean |Δ| over the row's values
    rel_error: np.ndarray  # float64 [rows]: mean relative error (regressions; 0 for classifiers)
    classifier: bool


def is_classifier(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] > 1 and output.dtype.kind == "f"


def compare(primary: np.ndarray, other: np.ndarray, tolerance: float) -> RowComparison:
    """``primary`` against ``other``, row by row (same shape: the versions share a signature)."""
    rows = len(primary)
    a = np.asarray(primary, np.float64).reshape(rows, -1)
    b = np.asarray(other, np.float64).reshape(rows, -1)
    diff = np.abs(a - b)
    if is_classifier(primary):
        agreed = np.argmax(a, axis=1) == np.argmax(b, axis=1)
        return RowComparison(agreed, diff.mean(axis=1), np.zeros(rows), True)
    scale = np.maximum(np.abs(a), FLOOR)
    agreed = np.all(diff <= tolerance * scale, axis=1)
    return RowComparison(agreed, diff.mean(axis=1), (diff / scale).mean(axis=1), False)


class Agreement:
    """Running figures of one (model, primary version, other version) pair, for the life of the
    process: plain sums on the event loop, exported at scrape time."""

    __slots__ = ("model", "primary", "other", "rows", "agreed", "abs_diff", "rel_error", "max_abs_diff", "classifier")

    def __init__(self, model: str, primary: int, other: int) -> None:
        self.model, self.primary, self.other = model, primary, other
        self.rows = 0
        self.agreed = 0
        self.abs_diff = 0.0  # sum of per-row mean |Δ|
        self.rel_error = 0.0  # sum of per-row relative errors
        self.max_abs_diff = 0.0
        self.classifier: bool | None = None

    def add(self, result: RowComparison) -> None:
        self.rows += len(result.agreed)
        self.agreed += int(result.agreed.sum())
        self.abs_diff += float(result.abs_diff.sum())
        self.rel_error += float(result.rel_error.sum())
        if len(result.abs_diff):
            self.max_abs_diff = max(self.max_abs_diff, float(result.abs_diff.max()))
        self.classifier = result.classifier

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.rows if self.rows else None

    def as_dict(self) -> dict[str, Any]:
        rows = self.rows or 1
        figures: dict[str, Any] = {
            "primary": str(self.primary),
            "version": str(self.other),
            "rows": self.rows,
            "kind": "classifier" if self.classifier else "regression" if self.classifier is False else "",
            "agreement": self.agreement,
            "mean_abs_diff": self.abs_diff / rows if self.rows else None,
            "max_abs_diff": self.max_abs_diff if self.rows else None,
        }
        if self.classifier is False:
            figures["mean_relative_error"] = self.rel_error / rows
        return figures
