"""One function per bundled model: load data, train, export to the repository, write the report."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import classifier, data, regression, report
from .export import TensorContract, command_line, export

log = logging.getLogger(__name__)

MODELS = ("profit", "house_price", "fashion_softmax", "fashion_cnn")
PARITY_SAMPLES = 1000


@dataclass
class Options:
    repository: Path
    reports: Path
    data_dir: Path | None = None
    version: int = 1
    seed: int = 1
    epochs: int | None = None  # override the model's default
    limit: int | None = None  # train on the first N training images only (quick runs, tests)
    fetch: bool = False


def train_profit(opts: Options) -> dict[str, Any]:
    """profit = a·population + b on ex1data1; graph in people → US dollars."""
    table, digest = data.load_csv("ex1data1.txt")
    x, y = table[:, :1], table[:, 1]
    start = time.perf_counter()
    fit = regression.fit_gradient_descent(x, y, lr=0.1, steps=2000, seed=opts.seed)
    seconds = time.perf_counter() - start
    optimum = regression.closed_form(x, y)
    module = regression.NormalizedLinear(fit, in_scale=[1e-4], out_scale=1e4)
    with torch.no_grad():
        p35, p70 = module(torch.tensor([[35000.0], [70000.0]])).numpy()[:, 0]
    metrics = {
        "slope_per_10k": float(fit.weights[0]),
        "intercept_10k_usd": fit.bias,
        "mse": fit.mse(x, y),
        "closed_form_mse": optimum.mse(x, y),
        "mse_relative_gap": fit.mse(x, y) / optimum.mse(x, y) - 1,
        "prediction_35000_usd": float(p35),
        "prediction_70000_usd": float(p70),
        "gd_steps": len(fit.losses),
        "learning_rate": 0.1,
        "train_seconds": seconds,
    }
    sample = np.random.default_rng(opts.seed).uniform(0, 300_000, (PARITY_SAMPLES, 1)).astype(np.float32)
    metrics["parity_max_diff"] = _export(
        opts,
        "profit",
        module,
        sample,
        metrics,
        digest,
        TensorContract("population", "float32", ("N", 1), "people", "city population"),
        TensorContract("profit", "float32", ("N", 1), "USD", "predicted food-truck profit"),
        "Food-truck profit from city population: linear regression by gradient descent on MSE (course data ex1data1).",
    )
    out = opts.reports / "profit"
    report.plot_fit(
        out,
        x[:, 0],
        y,
        fit.weights[0],
        fit.bias,
        "population (10,000s)",
        "profit ($10,000s)",
        "profit: gradient-descent fit",
    )
    report.plot_loss(out, {"MSE": fit.losses}, "profit: training loss", "MSE ($10,000s²)", log_y=True)
    report.write_metrics(out, metrics)
    return metrics


def train_house_price(opts: Options) -> dict[str, Any]:
    """price = w1·size + w2·bedrooms + w0 on ex1data2; normalisation inside the graph."""
    table, digest = data.load_csv("ex1data2.txt")
    x, y = table[:, :2], table[:, 2]
    start = time.perf_counter()
    fit = regression.fit_gradient_descent(x, y, lr=0.1, steps=3000, seed=opts.seed)
    seconds = time.perf_counter() - start
    optimum = regression.closed_form(x, y)
    module = regression.NormalizedLinear(fit, in_scale=[1.0, 1.0], out_scale=1.0)
    with torch.no_grad():
        p = float(module(torch.tensor([[1650.0, 3.0]]))[0, 0])
    metrics = {
        "weights": fit.weights.tolist(),
        "intercept_usd": fit.bias,
        "mse": fit.mse(x, y),
        "closed_form_mse": optimum.mse(x, y),
        "mse_relative_gap": fit.mse(x, y) / optimum.mse(x, y) - 1,
        "prediction_1650sqft_3br_usd": p,
        "gd_steps": len(fit.losses),
        "learning_rate": 0.1,
        "train_seconds": seconds,
    }
    rng = np.random.default_rng(opts.seed)
    sample = np.stack([rng.uniform(500, 5000, PARITY_SAMPLES), rng.integers(1, 6, PARITY_SAMPLES)], axis=1).astype(
        np.float32
    )
    metrics["parity_max_diff"] = _export(
        opts,
        "house_price",
        module,
        sample,
        metrics,
        digest,
        TensorContract(
            "features", "float32", ("N", 2), "[sq ft, bedrooms]", "house size in square feet and number of bedrooms"
        ),
        TensorContract("price", "float32", ("N", 1), "USD", "predicted house price"),
        "House price from size and bedrooms: linear regression by gradient descent on MSE (course data ex1data2).",
    )
    out = opts.reports / "house_price"
    report.plot_loss(out, {"MSE": fit.losses}, "house_price: training loss", "MSE ($²)", log_y=True)
    report.write_metrics(out, metrics)
    return metrics


def train_fashion(opts: Options, name: str) -> dict[str, Any]:
    """Softmax regression or CNN on Fashion-MNIST; exported with uint8 input and softmax inside."""
    files = data.locate_fashion(opts.data_dir, fetch=opts.fetch)
    train_set, test_set = data.load_fashion(files, "train"), data.load_fashion(files, "test")
    train_x, train_y = train_set.images[: opts.limit], train_set.labels[: opts.limit]
    cfg = classifier.DEFAULTS[name]
    cfg = dataclasses.replace(cfg, seed=opts.seed, epochs=opts.epochs or cfg.epochs)
    net, history = classifier.train(name, train_x, train_y, test_set.images, test_set.labels, cfg)
    predictions = classifier.predict_logits(net, test_set.images).argmax(1)
    matrix = report.confusion_matrix(test_set.labels, predictions)
    metrics = {
        "test_accuracy": float((predictions == test_set.labels).mean()),
        "train_accuracy_last_epoch": history.train_acc[-1],
        "train_images": len(train_x),
        "test_images": len(test_set.labels),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "optimizer": "AdamW + one-cycle LR",
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_seconds": history.seconds,
        "per_class_accuracy": dict(zip(data.CLASS_NAMES, (matrix.diagonal() / matrix.sum(1)).tolist())),
    }
    digest = data.sha256_of_content(files["train-images-idx3-ubyte"])
    kind = (
        "one linear layer (784→10) with the pixel scaling folded into its weights, softmax"
        if name == "fashion_softmax"
        else "small CNN (3 conv blocks)"
    )
    metrics["parity_max_diff"] = _export(
        opts,
        name,
        classifier.served_module(net),
        test_set.images[:PARITY_SAMPLES],
        metrics,
        digest,
        TensorContract("image", "uint8", ("N", 1, 28, 28), "pixel intensity 0-255", "grayscale 28x28 image"),
        TensorContract("probabilities", "float32", ("N", 10), "probability", "class probabilities"),
        f"Fashion-MNIST classifier: {kind}; scaling and softmax inside the graph.",
        class_names=data.CLASS_NAMES,
        reference=classifier.ImageClassifier(net),
    )
    out = opts.reports / name
    report.plot_loss(out, {"train loss": history.train_loss}, f"{name}: training loss", "cross-entropy")
    report.plot_confusion(
        out, matrix, data.CLASS_NAMES, f"{name}: test confusion matrix (acc {metrics['test_accuracy']:.4f})"
    )
    report.write_metrics(out, {**metrics, "history": dataclasses.asdict(history), "confusion_matrix": matrix.tolist()})
    return metrics


def _export(
    opts: Options,
    name: str,
    module: torch.nn.Module,
    sample: np.ndarray,
    metrics: dict[str, Any],
    digest: str,
    inputs: TensorContract,
    outputs: TensorContract,
    description: str,
    class_names: list[str] | None = None,
    reference: torch.nn.Module | None = None,
) -> float:
    metadata: dict[str, object] = {
        "description": description,
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, dict)},
        "training_data_sha256": digest,
        "training_command": command_line(),
        "seed": str(opts.seed),
        "input_units": inputs.unit,
        "output_units": outputs.unit,
    }
    if class_names:
        metadata["class_names"] = class_names
    _, diff = export(
        module,
        opts.repository,
        name,
        opts.version,
        inputs=inputs,
        outputs=outputs,
        parity_sample=sample,
        metadata=metadata,
        card_extra={},
        reference=reference,
    )
    return diff


TRAINERS: dict[str, Callable[[Options], dict[str, Any]]] = {
    "profit": train_profit,
    "house_price": train_house_price,
    "fashion_softmax": lambda opts: train_fashion(opts, "fashion_softmax"),
    "fashion_cnn": lambda opts: train_fashion(opts, "fashion_cnn"),
}
