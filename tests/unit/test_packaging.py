"""The distribution's metadata (pyproject.toml) as pip and the server see it; resolution against
the package index: tests/e2e/test_packaging.py."""

from __future__ import annotations

import tomllib
from importlib import metadata

from fixtures.servers import REPO_ROOT

from service import DISTRIBUTION, installed_version

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def test_distribution_name_is_ours_and_the_scripts_keep_theirs() -> None:
    """ "model-serving" on PyPI is an unrelated project (2.0.6): the distribution is renamed, the
    import packages and console scripts are not."""
    assert PROJECT["name"] == DISTRIBUTION == "onnx-v2-serving"
    assert PROJECT["scripts"] == {
        "model-serving": "service.__main__:main",
        "model-train": "training.__main__:main",
        "model-batch": "service.jobs.__main__:main",
    }


def test_one_onnxruntime_build_per_extra() -> None:
    """No onnxruntime in the base dependencies; cpu and gpu name one build each; the extras that
    run models on the CPU (train, test) bring cpu, never gpu."""
    extras = PROJECT["optional-dependencies"]
    assert not [r for r in PROJECT["dependencies"] if r.startswith("onnxruntime")]
    assert extras["cpu"] == ["onnxruntime>=1.20"] and extras["gpu"] == ["onnxruntime-gpu>=1.20"]
    for name in ("train", "test"):
        assert f"{DISTRIBUTION}[cpu]" in extras[name], name
        assert not [r for r in extras[name] if "gpu" in r], name


def test_installed_version_is_the_distributions() -> None:
    assert installed_version() == metadata.version(DISTRIBUTION) == PROJECT["version"]


def test_changelog_keeps_a_changelog_and_starts_at_this_version() -> None:
    """CHANGELOG.md (Keep a Changelog 1.1.0): an Unreleased section, then releases, newest first,
    each `## [X.Y.Z] - YYYY-MM-DD` with Added/Changed/... subsections; the newest release is the
    version in pyproject.toml (what the server reports once installed)."""
    import re

    text = (REPO_ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog\n") and "keepachangelog.com/en/1.1.0" in text
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", text, re.M)
    assert headings[0] == ("Unreleased", "")
    releases = [version for version, _ in headings[1:]]
    assert releases and releases[0] == PROJECT["version"]
    assert all(date for _, date in headings[1:])
    kinds = set(re.findall(r"^### (\w+)$", text, re.M))
    assert kinds and kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
