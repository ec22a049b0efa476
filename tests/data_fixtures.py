"""Fixtures for the real Fashion-MNIST files (import them into a test module to use them).

The files come from $FASHION_DATA_DIR, ../shared/data, or the project cache data/fashion-mnist
(./scripts/test.sh makes sure one of them exists). Tests never download anything.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from training import data

REPO_ROOT = Path(__file__).resolve().parents[1]


def data_root() -> Path | None:
    """The folder to pass as --data-dir, or None to rely on the project cache."""
    for candidate in (os.environ.get("FASHION_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def fashion_files() -> dict[str, Path]:
    try:
        return data.locate_fashion(data_root())
    except data.DataError as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")


@pytest.fixture(scope="session")
def fashion_dir(fashion_files: dict[str, Path]) -> Path:
    return next(iter(fashion_files.values())).parent


@pytest.fixture(scope="session")
def fashion_test(fashion_files: dict[str, Path]) -> data.Split:
    return data.load_fashion(fashion_files, "test")
