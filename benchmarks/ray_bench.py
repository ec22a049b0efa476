"""Images/s of the Ray Data pipeline with 1 and 2 actors against the single-process batch job.

    python benchmarks/ray_bench.py                      # 100,000 images, fashion_softmax and fashion_cnn
    python benchmarks/ray_bench.py --rows 20000 --models fashion_cnn --json out.json

The input is the Fashion-MNIST test set tiled to --rows images, saved once as an uncompressed .npy
(both engines read it with the same reader). Every run classifies all of it and writes its
results like a user's run would:

* batch job: ``python -m service.batch classify --local`` in this process (Job + LocalBackend,
  --chunk-size 256, fsync off), with onnxruntime's default intra-op threads (one per core) and
  with 1 thread; the rate is rows over the job's compute loop (its own ``rate``);
* Ray: ``run_pipeline`` on a local Ray instance (all cores, started once; its start-up time is
  printed apart), 1 and 2 actors x 1 CPU (1 intra-op thread each), batch size 256, Parquet out;
  the rate is rows over the pipeline's execution, actor start-up and Parquet writing included.

Configurations run interleaved, --repeat rounds of each; the table gives the best and the median
rate. On a shared machine the best of a few runs is the least disturbed one.

Prints one table, and the load average after each round: other work on the machine skews it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def test_images() -> np.ndarray:
    from training.data import locate_fashion, parse_idx

    root = os.environ.get("FASHION_DATA_DIR") or (REPO_ROOT.parent / "shared" / "data")
    files = locate_fashion(root if Path(root).is_dir() else None)
    raw = files["t10k-images-idx3-ubyte"].read_bytes()
    return parse_idx(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw, "t10k-images").astype(np.uint8)


def batch_job(npy: Path, out: Path, model: str, threads: int | None) -> tuple[float, float]:
    """(rows/s of the compute loop, wall seconds) of the single-process batch job."""
    from service.jobs import Job, JobConfig, LocalBackend, open_images

    previous = os.environ.get("SERVING_INTRA_OP_THREADS")
    if threads is not None:
        os.environ["SERVING_INTRA_OP_THREADS"] = str(threads)
    try:
        started = time.monotonic()
        backend = LocalBackend(REPO_ROOT / "models", "classify", model)
        job = Job(
            "classify",
            open_images(npy),
            backend,
            JobConfig(output=out, chunk_size=256, progress="none", sync=False, log=lambda m: None),
        )
        job.run()
        backend.close()
        return job.rate, time.monotonic() - started
    finally:
        if previous is None:
            os.environ.pop("SERVING_INTRA_OP_THREADS", None)
        else:
            os.environ["SERVING_INTRA_OP_THREADS"] = previous


def ray_run(npy: Path, out: Path, model: str, actors: int) -> tuple[float, float]:
    from service.jobs.ray_pipeline import PipelineConfig, run_pipeline

    started = time.monotonic()
    summary = run_pipeline(
        PipelineConfig(
            inputs=[npy],
            output=out,
            model=model,
            model_repository=REPO_ROOT / "models",
            actors=actors,
            cpus_per_actor=1,
            verify=False,
            log=lambda m: None,
        )
    )
    return summary["images_per_second"], time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="images per run [default 100000]")
    parser.add_argument("--models", nargs="+", default=["fashion_softmax", "fashion_cnn"])
    parser.add_argument("--actors", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds; each round runs every configuration once, interleaved [default 3]",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import ray

    cores = os.cpu_count() or 1
    print(f"machine: {cores} CPU cores; load average before: {load_avg()}", flush=True)
    images = test_images()
    tiled = np.resize(images, (args.rows, *images.shape[1:]))
    configs = []
    for model in args.models:
        configs += [
            (model, "batch job, 1 process, ort default threads", lambda npy, o, m=model: batch_job(npy, o, m, None)),
            (model, "batch job, 1 process, 1 thread", lambda npy, o, m=model: batch_job(npy, o, m, 1)),
        ]
        configs += [
            (
                model,
                f"ray pipeline, {a} actor{'s' if a > 1 else ''} x 1 CPU",
                lambda npy, o, m=model, a=a: ray_run(npy, o, m, a),
            )
            for a in args.actors
        ]
    rates: dict[tuple[str, str], list[float]] = {(m, e): [] for m, e, _ in configs}
    walls: dict[tuple[str, str], list[float]] = {(m, e): [] for m, e, _ in configs}
    loads = []
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        npy = Path(tmp) / "images.npy"
        np.save(npy, tiled)
        started = time.monotonic()
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
        ray_start = time.monotonic() - started
        print(f"ray {ray.__version__} local instance started in {ray_start:.1f} s", flush=True)
        try:
            for round_ in range(1, args.repeat + 1):
                for model, engine, run in configs:
                    out = Path(tempfile.mkdtemp(dir=tmp))
                    rate, wall = run(npy, out)
                    shutil.rmtree(out, ignore_errors=True)
                    rates[model, engine].append(rate)
                    walls[model, engine].append(wall)
                    print(
                        f"  round {round_}  {model:16} {engine:42} {rate:>9,.0f} images/s  ({wall:.1f} s wall)",
                        flush=True,
                    )
                loads.append(load_avg())
                print(f"  load average after round {round_}: {loads[-1]}", flush=True)
        finally:
            ray.shutdown()
    print()
    print(f"| model | engine | images/s, best of {args.repeat} | median | wall s of the best ({args.rows:,} images) |")
    print("| --- | --- | ---: | ---: | ---: |")
    results = []
    for model, engine, _ in configs:
        best = max(range(len(rates[model, engine])), key=lambda i: rates[model, engine][i])
        result = {
            "model": model,
            "engine": engine,
            "rows": args.rows,
            "best_images_per_second": round(rates[model, engine][best]),
            "median_images_per_second": round(float(np.median(rates[model, engine]))),
            "best_wall_seconds": round(walls[model, engine][best], 2),
            "all_images_per_second": [round(r) for r in rates[model, engine]],
        }
        results.append(result)
        print(
            f"| {model} | {engine} | {result['best_images_per_second']:,} | {result['median_images_per_second']:,} | "
            f"{result['best_wall_seconds']} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"cores": cores, "ray_start_seconds": round(ray_start, 2), "loads": loads, "results": results}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
