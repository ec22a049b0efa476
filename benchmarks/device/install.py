"""On the device machine: join the onnxruntime-gpu parts (checked against MANIFEST.json) and unpack
it and the carried wheels into one folder that goes first on PYTHONPATH (``/tmp/site``). No pip,
no network, nothing of the machine's own Python changed: wheels are zip files, and these need no
build step. Prints the versions Python then imports.

    python3 benchmarks/device/install.py [--parts /tmp/ortgpu-parts] [--site /tmp/site] [--no-gpu]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def join(parts_dir: Path, out_dir: Path) -> Path:
    manifest = json.loads((parts_dir / "MANIFEST.json").read_text())
    wheel = out_dir / manifest["wheel"]
    if wheel.exists() and wheel.stat().st_size == manifest["bytes"]:
        return wheel
    missing = [p["name"] for p in manifest["parts"] if not (parts_dir / p["name"]).exists()]
    if missing:
        raise SystemExit(f"parts not here yet: {missing} (send them with stage.sh first)")
    digest = hashlib.sha256()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = wheel.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for part in manifest["parts"]:
            block = (parts_dir / part["name"]).read_bytes()
            if hashlib.sha256(block).hexdigest() != part["sha256"]:
                raise SystemExit(f"{part['name']} is damaged (SHA-256 differs): send it again")
            digest.update(block)
            out.write(block)
    if digest.hexdigest() != manifest["sha256"]:
        raise SystemExit("the joined wheel's SHA-256 differs from the manifest")
    tmp.rename(wheel)
    return wheel


def unpack(wheel: Path, site: Path) -> None:
    marker = site / f".installed-{wheel.name}"
    if marker.exists():
        return
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    for path in site.rglob("*.so*"):  # zip loses the execute bits; harmless for .so, but keep them
        path.chmod(0o755)
    marker.touch()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", type=Path, default=Path("/tmp/ortgpu-parts"))
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"))
    parser.add_argument("--no-gpu", action="store_true", help="only the small wheels (a dry run without the parts)")
    args = parser.parse_args()
    args.site.mkdir(parents=True, exist_ok=True)
    wheels = sorted((HERE / "wheels").glob("*.whl"))  # (PINNED.txt beside them: the versions)
    if not wheels:
        raise SystemExit(f"no wheels in {HERE / 'wheels'}: carry benchmarks/device/wheels")
    if not args.no_gpu:
        wheels.append(join(args.parts, Path("/tmp/ortgpu")))
    for wheel in wheels:
        unpack(wheel, args.site)
        print(f"unpacked {wheel.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
