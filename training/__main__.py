"""Command line: ``python -m training {train,fetch,evaluate}`` (console script ``model-train``).

Examples::

    python -m training train all --data-dir ../shared/data
    python -m training train fashion_cnn --epochs 3 --repository /tmp/models
    python -m training fetch
    python -m training evaluate --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .data import PROJECT_ROOT, DataError

log = logging.getLogger("training")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train models and export them to the model repository")
    train.add_argument(
        "models", nargs="+", metavar="MODEL", help="profit, house_price, fashion_softmax, fashion_cnn, or all"
    )
    train.add_argument(
        "--data-dir",
        type=Path,
        help="folder holding fashion-mnist/ (or the .gz files); default: $FASHION_DATA_DIR, then data/fashion-mnist",
    )
    train.add_argument("--fetch", action="store_true", help="download Fashion-MNIST if not found")
    train.add_argument("--repository", type=Path, default=PROJECT_ROOT / "models")
    train.add_argument("--reports", type=Path, default=PROJECT_ROOT / "reports")
    train.add_argument("--version", type=int, default=1)
    train.add_argument("--seed", type=int, default=1)
    train.add_argument("--epochs", type=int, help="override the model's default epoch count")
    train.add_argument("--limit", type=int, help="train on the first N training images only")
    train.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")

    fetch = sub.add_parser("fetch", help="download and verify Fashion-MNIST into data/fashion-mnist")
    fetch.add_argument("--data-dir", type=Path, help="use (and verify) this local copy instead")

    evaluate = sub.add_parser(
        "evaluate",
        help="check the models a repository holds with onnxruntime (the others are skipped, and named)",
    )
    evaluate.add_argument("--repository", type=Path, default=PROJECT_ROOT / "models")
    evaluate.add_argument("--version", type=int, default=1, help="the model version to evaluate")
    evaluate.add_argument("--data-dir", type=Path, help="Fashion-MNIST, for the classifiers (as for train)")
    for p in (train, fetch, evaluate):
        p.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return {"train": _train, "fetch": _fetch, "evaluate": _evaluate}[args.command](args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from .train import MODELS, TRAINERS, Options  # torch is imported only here

    names = list(MODELS) if "all" in args.models else args.models
    unknown = [n for n in names if n not in TRAINERS]
    if unknown:
        print(f"error: unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)} or all", file=sys.stderr)
        return 2
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise DataError(f"{args.data_dir}: data directory does not exist")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    opts = Options(
        repository=args.repository,
        reports=args.reports,
        data_dir=args.data_dir,
        version=args.version,
        seed=args.seed,
        epochs=args.epochs,
        limit=args.limit,
        fetch=args.fetch,
    )
    summary = {}
    for name in names:
        start = time.perf_counter()
        log.info("training %s", name)
        summary[name] = TRAINERS[name](opts)
        log.info("%s done in %.1f s", name, time.perf_counter() - start)
    print(
        json.dumps(
            {n: {k: v for k, v in m.items() if not isinstance(v, (dict, list))} for n, m in summary.items()}, indent=2
        )
    )
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from .data import locate_fashion

    files = locate_fashion(args.data_dir, fetch=True)
    print("\n".join(f"{stem}: {path}" for stem, path in files.items()))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Evaluate the models ``--repository`` holds (version ``--version``); name the ones it does
    not hold on stderr. Exit 0; 1 when a model that is there fails to run; 2 when there is
    nothing to evaluate (or the data is missing or bad)."""
    try:
        from . import data, evaluate
    except ImportError as exc:
        if exc.name != "onnxruntime":
            raise
        print("error: onnxruntime is not installed: pip install '.[cpu]' (or '.[train]')", file=sys.stderr)
        return 2

    repository, version = args.repository, args.version
    if not repository.is_dir():
        raise DataError(f"{repository}: model repository does not exist")
    names = ("fashion_softmax", "fashion_cnn", "profit", "house_price")
    paths = {name: repository / name / str(version) / "model.onnx" for name in names}
    present = [name for name in names if paths[name].is_file()]
    if not present:
        raise DataError(
            f"{repository}: no model to evaluate (looked for <name>/{version}/model.onnx, name in {', '.join(names)})"
        )
    classifiers = [name for name in present if name.startswith("fashion_")]
    test = data.load_fashion(data.locate_fashion(args.data_dir), "test") if classifiers else None

    def run(name: str) -> dict[str, float]:
        if name in classifiers:
            assert test is not None
            return {name: evaluate.classifier_accuracy(repository, name, test, version)}
        if name == "profit":
            return evaluate.profit_predictions(repository, version)
        return evaluate.house_price_predictions(repository, version)

    result: dict[str, float] = {}
    failed: dict[str, str] = {}
    for name in present:
        try:
            result.update(run(name))
        except Exception as exc:  # onnxruntime's errors: one line per model, never a traceback
            failed[name] = " ".join(f"{type(exc).__name__}: {exc}".split())
    print(json.dumps(result, indent=2))
    for name in names:
        if name not in present:
            print(f"skipped {name}: {paths[name]} not found", file=sys.stderr)
    for name, why in failed.items():
        print(f"error: {name}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
