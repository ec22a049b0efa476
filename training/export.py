"""ONNX export into the model repository, with checker, parity check, metadata and model card.

Layout (Triton-style): ``<repository>/<name>/<version>/model.onnx`` and ``card.json`` beside it.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

log = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-5


@dataclass(frozen=True)
class TensorContract:
    """One graph input or output as the service sees it."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # "N" marks the dynamic batch axis
    unit: str
    description: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "unit": self.unit,
            "description": self.description,
        }


class ParityError(Exception):
    """onnxruntime and torch disagree beyond the tolerance."""


def library_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def parity(module: nn.Module, path: Path, sample: np.ndarray, input_name: str) -> float:
    """Largest difference between torch and onnxruntime on ``sample``.

    Absolute for outputs within [-1, 1] (probabilities); relative to |torch| above that
    (dollar outputs in the tens of thousands carry float32's ~1e-7 relative precision).
    """
    with torch.no_grad():
        expected = module(torch.from_numpy(sample)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {input_name: sample})[0]
    scale = np.maximum(1.0, np.abs(expected))
    return float(np.max(np.abs(actual.astype(np.float64) - expected) / scale))


def export(
    module: nn.Module,
    repository: Path,
    name: str,
    version: int,
    *,
    inputs: TensorContract,
    outputs: TensorContract,
    parity_sample: np.ndarray,
    metadata: dict[str, object],
    card_extra: dict[str, object],
    reference: nn.Module | None = None,
) -> tuple[Path, float]:
    """Export ``module`` to ``repository/name/version``; verify it; write metadata and card.

    Parity is measured against ``reference`` (default: ``module`` itself), e.g. the model as
    trained when ``module`` is a rewritten equivalent of it for serving. Returns the model path
    and the parity figure (raises ParityError when it exceeds 1e-5).
    """
    module = module.eval()
    target = repository / name / str(version)
    target.mkdir(parents=True, exist_ok=True)
    path = target / "model.onnx"
    example = torch.from_numpy(parity_sample[:2])
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[inputs.name],
        output_names=[outputs.name],
        dynamic_axes={inputs.name: {0: "N"}, outputs.name: {0: "N"}},
        opset_version=OPSET,
        dynamo=False,  # the TorchScript exporter: no onnxscript dependency, small plain graphs
    )
    model = onnx.load(str(path))
    props = {
        "name": name,
        "version": str(version),
        "inputs": json.dumps([inputs.as_dict()]),
        "outputs": json.dumps([outputs.as_dict()]),
        "versions": json.dumps(library_versions()),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
    }
    onnx.helper.set_model_props(model, props)
    model.producer_name = "model-serving training"
    model.doc_string = str(metadata.get("description", ""))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    diff = parity((reference or module).eval(), path, parity_sample, inputs.name)
    log.info("%s v%d: parity torch vs onnxruntime on %d inputs: max diff %.3g", name, version, len(parity_sample), diff)
    if diff > PARITY_TOLERANCE:
        raise ParityError(f"{name}: onnxruntime differs from torch by {diff:.3g} > {PARITY_TOLERANCE}")
    card = {
        "name": name,
        "version": version,
        "format": "onnx",
        "opset": OPSET,
        "inputs": [inputs.as_dict()],
        "outputs": [outputs.as_dict()],
        "parity_max_diff": diff,
        "parity_samples": len(parity_sample),
        **card_extra,
        **{k: v for k, v in metadata.items()},
        "library_versions": library_versions(),
    }
    (target / "card.json").write_text(json.dumps(card, indent=2, default=_jsonable) + "\n")
    return path, diff


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def command_line() -> str:
    return " ".join(["python -m training", *sys.argv[1:]])
