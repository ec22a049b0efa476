"""The repository scanner (service.core.discovery): ``<root>/<name>/<version>/model.onnx``, one
problem per bad folder, never a crash; versions in ASCII digits only."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.discovery import MODEL_FILE, Failure, file_signature, is_model_dir, scan, version_number


@pytest.mark.parametrize(
    ("folder", "version"),
    [
        ("1", 1),
        ("12", 12),
        ("007", 7),
        ("0", None),
        ("-1", None),
        ("1.0", None),
        ("latest", None),
        ("²", None),
        ("１", None),
        ("٣", None),
        ("", None),
    ],
)
def test_version_number(folder: str, version: int | None) -> None:
    assert version_number(folder) == version


def test_scan_records_problems_and_goes_on(tmp_path: Path) -> None:
    for folder in (
        "good/1",
        "good/2",
        "good/.staging",
        "good/_tmp",
        "noversion",
        "bad/latest",
        "bad/3",
        "digits/²",
        "digits/１",
        "digits/0",
        ".hidden/1",
        "_private/1",
    ):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "good" / "1" / MODEL_FILE).write_bytes(b"x")
    (tmp_path / "a-file").write_text("not a model folder")
    found = scan(tmp_path)
    assert found is not None
    assert found.found == {
        "good": {1: tmp_path / "good" / "1" / MODEL_FILE, 2: tmp_path / "good" / "2" / MODEL_FILE},
        "bad": {3: tmp_path / "bad" / "3" / MODEL_FILE},
    }
    assert found.on_disk == {"good": {"1", "2"}, "noversion": set(), "bad": {"latest", "3"}, "digits": {"²", "１", "0"}}
    assert set(found.problems) == {
        Failure("noversion"),
        Failure("bad", "latest"),
        Failure("digits", "²"),
        Failure("digits", "１"),
        Failure("digits", "0"),
    }
    assert "no version directories; expected noversion/<version>/model.onnx" in found.problems[Failure("noversion")]
    assert found.problems[Failure("digits", "²")] == "version directory must be a positive integer, got '²'"
    assert str(Failure("digits", "²")) == "digits/²" and str(Failure("noversion")) == "noversion"


def test_scan_scope_and_an_unreadable_root(tmp_path: Path) -> None:
    (tmp_path / "a" / "1").mkdir(parents=True)
    (tmp_path / "b" / "1").mkdir(parents=True)
    scoped = scan(tmp_path, {"b"})
    assert scoped is not None and list(scoped.found) == ["b"]
    assert scan(tmp_path / "missing") is None


def test_is_model_dir_matches_the_listing_only(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / ".staging").mkdir()
    (tmp_path / "file").write_text("")
    assert is_model_dir(tmp_path, "m")
    for name in ("", "..", ".", "m/../m", "m/1", "m\x00", "é" * 300, ".staging", "file", "nope"):
        assert not is_model_dir(tmp_path, name), name


def test_file_signature_changes_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / MODEL_FILE
    assert file_signature(path) is None
    path.write_bytes(b"one")
    first = file_signature(path)
    replacement = tmp_path / "new"
    replacement.write_bytes(b"other")
    replacement.replace(path)
    assert first is not None and file_signature(path) not in (None, first)
