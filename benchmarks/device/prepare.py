"""Get everything the device run needs ready here (with network), then print the commands.

    .venv/bin/python benchmarks/device/prepare.py

1. ``wheels/``: cp312 manylinux wheels of requirements.txt (what serving imports that the device
   machine lacks; --no-deps, the list is complete), about 11 MB.
2. ``big/``: onnxruntime-gpu 1.31.1 for cp312 (CUDA 13), 256 MB, split into ``parts/`` of at most
   ``--part-mib`` MiB (one per command: a command carries 64 MiB in all, the work tree included)
   with ``parts/MANIFEST.json`` (sizes and SHA-256 of the parts and of the whole wheel).
3. ``data/``: the Fashion-MNIST test set (10,000 images, 4.4 MB) for the parity check.

All four folders are ignored by git (never committed). The command sequence it prints is the one
in README.md, with this run's part names and sizes; every command's carry is checked against the
64 MiB limit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GPU_WHEEL = "onnxruntime-gpu==1.31.1"
CARRY_LIMIT_MIB = 64.0
MiB = 1024 * 1024
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def download(args: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [
        f for p in ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64") for f in ("--platform", p)
    ]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", str(dest), *args],
        check=True,
    )  # fmt: skip


def pinned(requirements: Path) -> list[str]:
    """Each requirement at the version installed where this runs (the project's venv, so the
    device gets what the tests ran with: a merge that moves a pin needs no edit here), else at
    the version the file names."""
    from importlib import metadata

    pins = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, listed = line.partition("==")
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = listed
        pins.append(f"{name}=={version}" if version else name)
    return pins


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split(wheel: Path, parts_dir: Path, part_mib: float) -> dict:
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    size = int(part_mib * MiB)
    parts = []
    with open(wheel, "rb") as f:
        for index in range(1000):
            block = f.read(size)
            if not block:
                break
            part = parts_dir / f"{wheel.name}.part-{index:02d}"
            part.write_bytes(block)
            parts.append({"name": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {"wheel": wheel.name, "bytes": wheel.stat().st_size, "sha256": sha256(wheel), "parts": parts}
    (parts_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def find_test_set() -> Path | None:
    for folder in (ROOT / "data" / "fashion-mnist", ROOT.parent / "shared" / "data" / "fashion-mnist"):
        if all((folder / name).exists() for name in TEST_FILES):
            return folder
    return None


def tree_mib() -> float:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).exists()) / MiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part-mib", type=float, default=54.0)
    parser.add_argument("--skip-download", action="store_true", help="use the wheels already in wheels/ and big/")
    args = parser.parse_args()
    if not args.skip_download:
        shutil.rmtree(HERE / "wheels", ignore_errors=True)
        pins = pinned(HERE / "requirements.txt")
        download(pins, HERE / "wheels")
        (HERE / "wheels" / "PINNED.txt").write_text("\n".join(pins) + "\n")
        download([GPU_WHEEL], HERE / "big")
    wheel = next((HERE / "big").glob("onnxruntime_gpu-*.whl"))
    manifest = split(wheel, HERE / "parts", args.part_mib)
    source = find_test_set()
    if source is None:
        print("Fashion-MNIST test set not found: run `python -m training fetch` first", file=sys.stderr)
        return 1
    (HERE / "data").mkdir(exist_ok=True)
    for name in TEST_FILES:
        shutil.copyfile(source / name, HERE / "data" / name)  # not the source's read-only mode

    tree = tree_mib()
    wheels = sum(p.stat().st_size for p in (HERE / "wheels").iterdir()) / MiB
    data = sum(p.stat().st_size for p in (HERE / "data").iterdir()) / MiB
    parts = manifest["parts"]
    print(f"work tree {tree:.1f} MiB; wheels {wheels:.1f} MiB; test set {data:.1f} MiB; "
          f"{manifest['wheel']} {manifest['bytes'] / MiB:.1f} MiB in {len(parts)} parts\n")  # fmt: skip
    print("Device commands (run tool), back to back while the machine stays up:\n")
    rel = "benchmarks/device"
    for i, part in enumerate(parts[:-1], 1):
        carried = tree + part["bytes"] / MiB
        print(f"{i}. carry [{rel}/parts/{part['name']}]  ({carried:.1f} MiB with the tree)")
        print(f"   command: bash {rel}/stage.sh")
    last = parts[-1]
    carried = tree + last["bytes"] / MiB + wheels + data
    print(f"{len(parts)}. carry [{rel}/parts/{last['name']}, {rel}/parts/MANIFEST.json, {rel}/wheels, {rel}/data]"
          f"  ({carried:.1f} MiB with the tree)")  # fmt: skip
    print(f"   command: bash {rel}/stage.sh && bash {rel}/run.sh --provider cuda   (timeout_s 540)")
    worst = max([tree + p["bytes"] / MiB for p in parts[:-1]] + [carried])
    if worst > CARRY_LIMIT_MIB:
        print(f"\nover the {CARRY_LIMIT_MIB:g} MiB a command carries ({worst:.1f}): lower --part-mib", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
