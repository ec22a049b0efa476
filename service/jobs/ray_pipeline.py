"""Distributed batch inference on Ray Data: ``python -m service.jobs.ray_pipeline INPUT --output DIR``.

The single-machine batch job (``python -m service.jobs``) scaled out over a Ray cluster, with the
same model repository, the same input readers and the same inference code, hence the same results
row for row. Needs the ``ray`` extra (``pip install 'onnx-v2-serving[ray]'``).

Pipeline (Ray Data, streaming; nothing is materialised on the driver)::

    read units ──▶ map_batches(OnnxPredictor)  ──▶ write_parquet(DIR/predictions/)
    (row ranges      actor pool: one onnxruntime       row, predicted, label, probability,
     of the input)   session per actor, CPU or GPU     probabilities[10] (+ true, correct)

* **Inputs**: a Fashion-MNIST IDX file (gzip or not) or a ``.npy`` uint8 array [N, 28, 28] /
  [N, 1, 28, 28] — read with the batch job's own readers (:mod:`service.jobs.inputs`) — or Parquet
  (one file, several, or a folder) with an image column (``--image-column``, default ``image``:
  784 raw bytes, a list of 784 uint8, nested 28×28 lists, or a Ray tensor column) and optionally a
  label column. The input is cut into *read units* (``--rows-per-read`` rows of IDX/.npy; one
  Parquet row group each), and each unit carries its global row numbers, so every output row says
  which input row it belongs to, whatever the order blocks finish in.
* **Reading happens inside the predictor actors**: an actor reads its unit, then runs it. This
  keeps exact row numbers for every format, uses exactly the batch job's readers and checks, and
  needs no CPU beyond the actors' own — on a node whose CPUs all go to actors, separate read tasks
  can never be scheduled (Ray Data then waits forever: seen on a 2-core machine with 2 actors).
  The files must therefore be readable at the same path on every node (a shared file system).
* **Model**: the driver resolves the version once (the latest unless ``--version``), loads it to
  check it fits the input, and ships the ``model.onnx`` bytes to the actors through Ray's object
  store, so worker nodes need no copy of the repository. Each actor builds one session with the
  server's own code (:class:`~service.core.local.LocalModel`: same session options, provider
  rules, admission and checks), ``--batch-size``
  rows at a time, batches aligned on the same row numbers as the batch job's chunks.
* **Resources**: ``--actors N`` (fixed pool) or ``--actors N --max-actors M`` (autoscaling pool),
  ``--cpus-per-actor`` (also onnxruntime's intra-op thread count), ``--gpus-per-actor`` (Ray sets
  ``CUDA_VISIBLE_DEVICES``; the provider becomes ``cuda`` unless ``--provider`` says otherwise).
* **Where**: a local Ray instance by default (``--num-cpus`` caps it); an existing cluster with
  ``--address`` (e.g. ``auto`` on a cluster node, or ``ray job submit -- python -m ...``, which
  sets ``RAY_ADDRESS``). On a cluster the ``service`` package is shipped with the job
  (``runtime_env`` ``py_modules``); its dependencies (onnxruntime, numpy, pyarrow, pydantic) must
  be installed on the nodes — the server image plus ``ray[data]`` has them.
* **Output**: Parquet files in ``DIR/predictions/`` (sort by ``row`` for input order), written to a
  temporary folder and renamed when complete; then ``confusion_matrix.csv`` (and ``.png`` with
  matplotlib) when labels are known, and ``summary.json`` last (``"complete": true``), as the batch
  job does. There is no resume: Ray retries failed tasks and restarts failed actors, and a failed
  job is simply run again (``--overwrite`` replaces an earlier result).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import report

if TYPE_CHECKING:
    from ..core.local import LocalModel
from .inputs import IdxImages, InputError, NpyImages, open_images, read_labels

DEFAULT_MODEL = "fashion_softmax"
DEFAULT_BATCH = 256
DEFAULT_UNIT = 4096
PREDICTIONS = "predictions"
SUMMARY = "summary.json"
FORMAT = 1


class PipelineError(Exception):
    """The pipeline cannot run (model, settings, output folder, Ray)."""


# Ray's switch for single-machine instances: with it off, a local instance's processes listen on
# and talk over loopback (127.0.0.1) only, instead of the machine's network address.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _require_ray(local: bool = False) -> Any:
    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")  # read when ray is first imported
    try:
        import ray
    except ImportError:
        raise PipelineError(
            "Ray is not installed: pip install 'onnx-v2-serving[ray]' (ray[data] and pyarrow)"
        ) from None
    return ray


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet
    except ImportError:
        raise PipelineError("pyarrow is not installed: pip install 'onnx-v2-serving[ray]'") from None
    return pa


# -- the model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPlan:
    """The pinned model version and how actors run it."""

    name: str
    version: int
    path: str
    sha256: str
    input_name: str
    input_dtype: str
    input_shape: tuple[int, ...]
    output_name: str
    class_names: tuple[str, ...]
    provider: str  # auto | cpu | cuda
    intra_op_threads: int
    batch_size: int


def _settings(repository: Path, provider: str, threads: int, batch_size: int) -> Any:
    from ..settings import Settings

    return Settings(
        model_repository=repository,
        provider=provider,
        intra_op_threads=threads,
        inter_op_threads=1,
        max_request_rows=max(batch_size, 1),
    )


def _open(path: Path, name: str, version: int, settings: Any) -> LocalModel:
    """One model version through the server's own code (:class:`service.core.local.LocalModel`)."""
    from ..core.local import LocalModel
    from ..core.spec import ModelKey

    return LocalModel.open(path, ModelKey(name, version), settings)


def resolve_model(
    repository: Path, name: str, version: int, provider: str, cpus_per_actor: float, batch_size: int
) -> ModelPlan:
    """Pin the version, load it once on the driver (CPU) to read its tensors and class names."""
    from ..core.local import resolve_version
    from ..core.runtime import ProviderUnavailable
    from ..errors import ServingError

    try:
        key, path = resolve_version(Path(repository), name, version)
    except ServingError as exc:
        raise PipelineError(str(exc)) from None
    try:
        model = _open(path, key.name, key.version, _settings(Path(repository), "cpu", 1, batch_size))
    except (ProviderUnavailable, ValueError, OSError) as exc:
        raise PipelineError(f"cannot load {path}: {exc}") from exc
    except Exception as exc:  # onnxruntime's own exception types
        raise PipelineError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
    spec = model.spec
    image, output = spec.inputs[0], spec.outputs[0]
    if len(image.shape) != 4 or len(spec.inputs) != 1:
        raise PipelineError(
            f"model '{name}' takes {[(s.name, list(s.shape)) for s in spec.inputs]}; "
            "the pipeline needs one image input [N, C, H, W]"
        )
    if not spec.class_names:
        raise PipelineError(f"model '{name}' declares no class names")
    model.close()
    threads = max(1, math.ceil(cpus_per_actor)) if cpus_per_actor > 0 else 1
    return ModelPlan(
        name=key.name,
        version=key.version,
        path=str(path),
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        input_name=image.name,
        input_dtype=image.dtype.name,
        input_shape=tuple(image.shape),
        output_name=output.name,
        class_names=tuple(spec.class_names),
        provider=provider,
        intra_op_threads=threads,
        batch_size=batch_size,
    )


# -- the input ---------------------------------------------------------------------------------------


@dataclass
class InputPlan:
    """What the actors read: the files, their kind, and the read units (global row ranges)."""

    kind: str  # idx | npy | parquet
    paths: list[str]
    rows: int
    item_shape: tuple[int, ...]
    image_column: str = "image"
    label_column: str | None = None  # parquet: read labels from this column
    units: list[dict[str, int]] = field(default_factory=list)
    sha256: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "paths": self.paths,
            "rows": self.rows,
            "item_shape": list(self.item_shape),
            "image_column": self.image_column if self.kind == "parquet" else None,
            "label_column": self.label_column,
            "sha256": self.sha256 or None,
        }


def _parquet_files(inputs: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not found:
                raise InputError(f"{path}: folder holds no .parquet files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    return files


def plan_input(
    inputs: Sequence[Path],
    *,
    rows_per_read: int,
    image_column: str = "image",
    label_column: str | None = None,
    verify: bool = True,
) -> InputPlan:
    """Open and check the input; cut it into read units. Paths become absolute: Ray workers do not
    run in the driver's working directory."""
    inputs = [Path(p).resolve() for p in inputs]
    if not inputs:
        raise InputError("no input given")
    first = inputs[0]
    is_parquet = first.is_dir() or first.suffix.lower() in (".parquet", ".pq")
    if is_parquet or len(inputs) > 1:
        return _plan_parquet(_parquet_files(inputs), image_column, label_column)
    source = open_images(first)
    if not isinstance(source, (IdxImages, NpyImages)):
        raise InputError(
            f"{first}: the Ray pipeline reads IDX, .npy or Parquet inputs (PNG folders: use "
            "python -m service.jobs, or convert them to Parquet)"
        )
    if verify:
        source.verify()  # the batch job's full check: gzip CRC, sizes (and the sha256 for the summary)
    units = [
        {"start": s, "stop": min(s + rows_per_read, source.rows), "file": 0, "row_group": -1}
        for s in range(0, source.rows, rows_per_read)
    ]
    return InputPlan(
        kind=source.kind,
        paths=[str(first)],
        rows=source.rows,
        item_shape=tuple(source.item_shape),
        units=units,
        sha256=source.sha256,
    )


def _plan_parquet(files: list[Path], image_column: str, label_column: str | None) -> InputPlan:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    units: list[dict[str, int]] = []
    row = 0
    labels_in_all = True
    for index, path in enumerate(files):
        try:
            meta = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
        names = meta.schema_arrow.names
        if image_column not in names:
            raise InputError(f"{path}: no column '{image_column}' (columns: {names}); pass --image-column")
        labels_in_all &= (label_column or "label") in names
        if label_column and label_column not in names:
            raise InputError(f"{path}: no label column '{label_column}' (columns: {names})")
        for group in range(meta.num_row_groups):
            n = meta.metadata.row_group(group).num_rows
            if n:
                units.append({"start": row, "stop": row + n, "file": index, "row_group": group})
                row += n
    if row == 0:
        raise InputError(f"{files[0]}: the Parquet input holds no rows")
    # A column named "label" is used when every file has it (say --label-column to insist).
    label = label_column or ("label" if labels_in_all else None)
    return InputPlan(
        kind="parquet",
        paths=[str(f) for f in files],
        rows=row,
        item_shape=(),
        image_column=image_column,
        label_column=label,
        units=units,
    )


def _images_from_arrow(column: Any, item_shape: tuple[int, ...], where: str) -> np.ndarray:
    """uint8 [n, *item_shape] from an Arrow image column (binary, (nested) lists, tensor type)."""
    pa = _pyarrow()
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(column, pa.ExtensionArray):  # e.g. a Ray tensor column read without Ray's types
        column = column.storage
    if column.null_count:
        raise InputError(f"{where}: {column.null_count} missing images")
    n, item = len(column), math.prod(item_shape)
    kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        lengths = np.asarray(pc.binary_length(column)) if not pa.types.is_fixed_size_binary(kind) else None
        if (lengths is not None and (lengths != item).any()) or (lengths is None and kind.byte_width != item):
            bad = int(np.argmax(lengths != item)) if lengths is not None else 0
            raise InputError(
                f"{where}: image {bad} has {lengths[bad] if lengths is not None else kind.byte_width} "
                f"bytes, expected {item} ({'x'.join(map(str, item_shape))} uint8)"
            )
        buffers = column.buffers()  # [validity, offsets, data] or, fixed size, [validity, data]
        if lengths is None:
            first = column.offset * item
        else:
            offsets = np.frombuffer(buffers[1], np.int64 if pa.types.is_large_binary(kind) else np.int32)
            first = int(offsets[column.offset])  # every length is `item`: the bytes are contiguous
        data = np.frombuffer(buffers[-1], np.uint8)[first : first + n * item]
        images: np.ndarray = data.reshape(n, *item_shape).copy()
        return images
    flat = column
    while pa.types.is_list(flat.type) or pa.types.is_large_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
        flat = flat.flatten()
    if len(flat) != n * item:
        raise InputError(
            f"{where}: {len(flat)} pixels for {n} images; expected {item} per image ({'x'.join(map(str, item_shape))})"
        )
    values = flat.to_numpy(zero_copy_only=False)
    if values.dtype != np.uint8:
        if values.dtype.kind not in "iu" or (len(values) and (values.min() < 0 or values.max() > 255)):
            raise InputError(f"{where}: pixels must be uint8 0-255, got {values.dtype}")
        values = values.astype(np.uint8)
    reshaped: np.ndarray = values.reshape(n, *item_shape)
    return reshaped


# -- the predictor actor -----------------------------------------------------------------------------


def _deref(value: Any) -> Any:
    try:
        import ray

        if isinstance(value, ray.ObjectRef):
            return ray.get(value)
    except ImportError:
        pass
    return value


class OnnxPredictor:
    """A Ray Data actor: one onnxruntime session, built once; each call reads the units it is
    given and returns their predictions as an Arrow table."""

    def __init__(self, model: ModelPlan, model_bytes: Any, source: InputPlan, labels: Any = None) -> None:
        self.plan = model
        self.source = source
        self.labels = _deref(labels)
        data = _deref(model_bytes)
        if hashlib.sha256(data).hexdigest() != model.sha256:
            raise PipelineError(f"model bytes for {model.name} v{model.version} do not match their sha256")
        # The repository layout, as the server sees it; the file goes once the session holds it.
        folder = tempfile.mkdtemp(prefix="ray-model-")
        try:
            path = Path(folder) / model.name / str(model.version) / "model.onnx"
            path.parent.mkdir(parents=True)
            path.write_bytes(data)
            settings = _settings(Path(folder), model.provider, model.intra_op_threads, model.batch_size)
            self.model = _open(path, model.name, model.version, settings)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.item_shape = tuple(model.input_shape[1:])
        self._reader: Any = None

    # -- reading -----------------------------------------------------------------------------

    def _read(self, unit: dict[str, int]) -> tuple[np.ndarray, np.ndarray | None]:
        start, stop = int(unit["start"]), int(unit["stop"])
        if self.source.kind in ("idx", "npy"):
            if self._reader is None:
                self._reader = open_images(self.source.paths[0])
            images = next(self._reader.chunks(start, stop - start))
            labels = None if self.labels is None else np.asarray(self.labels[start:stop], dtype=np.int64)
            return images, labels
        import pyarrow.parquet as pq

        path = self.source.paths[int(unit["file"])]
        columns = [self.source.image_column] + ([self.source.label_column] if self.source.label_column else [])
        table = pq.ParquetFile(path).read_row_group(int(unit["row_group"]), columns=columns)
        if table.num_rows != stop - start:
            raise InputError(
                f"{path}: row group {unit['row_group']} has {table.num_rows} rows, "
                f"expected {stop - start} (file changed since the job started?)"
            )
        where = f"{path} row group {unit['row_group']}"
        images = _images_from_arrow(table.column(self.source.image_column), self.item_shape, where)
        labels = None
        if self.source.label_column:
            values = table.column(self.source.label_column)
            if values.null_count:
                raise InputError(f"{where}: {values.null_count} missing labels")
            labels = np.asarray(values.to_numpy(), dtype=np.int64)
        return images, labels

    # -- inference ---------------------------------------------------------------------------

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 [n, classes]: the batch job's local inference (same conversion and checks)."""
        from ..errors import ServingError

        if (
            tuple(images.shape[1:]) != self.item_shape
            and images.ndim == 3
            and (1, *images.shape[1:]) == self.item_shape
        ):
            images = images[:, None]
        try:
            return self.model.classify(images)
        except ServingError as exc:
            raise PipelineError(str(exc)) from None

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        pa = _pyarrow()
        tables = []
        for i in range(len(batch["start"])):
            unit = {key: int(batch[key][i]) for key in ("start", "stop", "file", "row_group")}
            images, truth = self._read(unit)
            size = self.plan.batch_size
            # Batches start at the same row numbers as the batch job's chunks (multiples of the size).
            first = unit["start"]
            edges = [first, *range((first // size + 1) * size, unit["stop"], size), unit["stop"]]
            probabilities = np.concatenate(
                [self.predict(images[a - first : b - first]) for a, b in itertools.pairwise(edges) if b > a]
            ).astype(np.float32, copy=False)
            tables.append(self._table(pa, unit, probabilities, truth))
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def _table(self, pa: Any, unit: dict[str, int], probabilities: np.ndarray, truth: np.ndarray | None) -> Any:
        names = np.asarray(self.plan.class_names, dtype=object)
        n, classes = probabilities.shape
        if classes != len(names):
            raise PipelineError(
                f"the model returned {classes} probabilities per row, but declares {len(names)} classes"
            )
        predicted = probabilities.argmax(axis=1).astype(np.int64)
        columns: dict[str, Any] = {
            "row": pa.array(np.arange(unit["start"], unit["stop"], dtype=np.int64)),
            "predicted": pa.array(predicted),
            "label": pa.array(names[predicted].tolist(), pa.string()),
            "probability": pa.array(probabilities[np.arange(n), predicted]),
            "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probabilities.reshape(-1)), classes),
        }
        if truth is not None:
            if len(truth) and (truth.min() < 0 or truth.max() >= classes):
                raise InputError(
                    f"labels of rows {unit['start']}-{unit['stop'] - 1} range from {truth.min()} to "
                    f"{truth.max()}; model '{self.plan.name}' has classes 0 to {classes - 1}"
                )
            columns["true"] = pa.array(truth)
            columns["true_label"] = pa.array(names[truth].tolist(), pa.string())
            columns["correct"] = pa.array(truth == predicted)
        return pa.table(columns)


# -- the job -------------------------------------------------------------------------------------


@dataclass
class PipelineConfig:
    inputs: list[Path]
    output: Path
    labels: Path | None = None
    model: str = DEFAULT_MODEL
    version: int = 0
    model_repository: Path | None = None
    provider: str | None = None
    actors: int = 1
    max_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = DEFAULT_BATCH
    rows_per_read: int = DEFAULT_UNIT
    image_column: str = "image"
    label_column: str | None = None
    address: str | None = None
    num_cpus: int | None = None
    overwrite: bool = False
    verify: bool = True
    log: Any = field(default=lambda message: print(message, file=sys.stderr, flush=True))


def _check_config(cfg: PipelineConfig) -> None:
    if cfg.actors < 1:
        raise PipelineError(f"--actors must be at least 1, got {cfg.actors}")
    if cfg.max_actors is not None and cfg.max_actors < cfg.actors:
        raise PipelineError(f"--max-actors ({cfg.max_actors}) is below --actors ({cfg.actors})")
    if cfg.cpus_per_actor < 0 or cfg.gpus_per_actor < 0:
        raise PipelineError("--cpus-per-actor and --gpus-per-actor cannot be negative")
    for flag, value in (("--cpus-per-actor", cfg.cpus_per_actor), ("--gpus-per-actor", cfg.gpus_per_actor)):
        if value > 1 and value != int(value):  # Ray's rule for resource amounts
            raise PipelineError(
                f"{flag} must be a whole number when above 1 (a fraction of one is fine), got {value:g}"
            )
    if cfg.batch_size < 1:
        raise PipelineError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.rows_per_read < cfg.batch_size or cfg.rows_per_read % cfg.batch_size:
        raise PipelineError(
            f"--rows-per-read ({cfg.rows_per_read}) must be a multiple of --batch-size ({cfg.batch_size})"
        )


def _provider(cfg: PipelineConfig) -> str:
    if cfg.provider:
        return cfg.provider
    env = os.environ.get("SERVING_PROVIDER")
    if env:
        return env
    return "cuda" if cfg.gpus_per_actor > 0 else "auto"


def _prepare_output(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    taken = [p for p in (out / PREDICTIONS, out / SUMMARY) if p.exists()]
    if taken and not overwrite:
        raise PipelineError(
            f"{out} already holds results ({', '.join(p.name for p in taken)}); "
            "choose another --output or pass --overwrite"
        )
    for stale in out.glob(f".{PREDICTIONS}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _confusion(directory: Path, n_classes: int) -> np.ndarray:
    """Streamed over the written Parquet files (two int columns), never whole in memory."""
    import pyarrow.dataset as pads

    dataset = pads.dataset(str(directory), format="parquet")
    pairs = (
        (b.column("true").to_numpy(), b.column("predicted").to_numpy())
        for b in dataset.to_batches(columns=["true", "predicted"])
    )
    return report.confusion_matrix(pairs, n_classes)


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the whole job; return the summary (also written to ``DIR/summary.json``).

    Uses the Ray instance this process is connected to, if any; otherwise starts or joins one
    (``cfg.address``) and shuts it down at the end."""
    from ..settings import BUNDLED_MODELS

    _check_config(cfg)
    address = cfg.address or os.environ.get("RAY_ADDRESS") or "local"
    ray = _require_ray(local=address == "local")
    started = time.monotonic()
    repository = Path(cfg.model_repository or os.environ.get("SERVING_MODEL_REPOSITORY") or BUNDLED_MODELS)
    provider = _provider(cfg)
    cfg.log(f"checking {', '.join(map(str, cfg.inputs))} ...")
    source = plan_input(
        cfg.inputs,
        rows_per_read=cfg.rows_per_read,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        verify=cfg.verify,
    )
    model = resolve_model(repository, cfg.model, cfg.version, provider, cfg.cpus_per_actor, cfg.batch_size)
    want = tuple(model.input_shape[1:])
    if source.kind == "parquet":
        source.item_shape = want
    elif len(want) != len(source.item_shape) or any(w >= 0 and w != g for w, g in zip(want, source.item_shape)):
        raise InputError(
            f"{source.paths[0]}: images are {list(source.item_shape)} each but model '{model.name}' takes {list(want)}"
        )
    if any(d < 0 for d in want):
        raise PipelineError(f"model '{model.name}' has dynamic image dimensions {list(model.input_shape)}")
    labels = None
    if cfg.labels is not None:
        if source.kind == "parquet":
            raise InputError("--labels is for IDX/.npy inputs; Parquet inputs carry a label column (--label-column)")
        labels, _ = read_labels(cfg.labels, source.rows)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(model.class_names)):
            raise InputError(
                f"{cfg.labels}: labels range from {labels.min()} to {labels.max()}; model "
                f"'{model.name}' has classes 0 to {len(model.class_names) - 1}"
            )
    has_labels = labels is not None or source.label_column is not None
    out = Path(cfg.output).resolve()
    _prepare_output(out, cfg.overwrite)

    ours = not ray.is_initialized()
    if ours:
        # address "local" always starts a new instance (a bare ray.init() would join one that
        # `ray start` left on this machine).
        init: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False}
        if address != "local":
            # Ship this package (its folder) with the job; workers still need its dependencies.
            init["runtime_env"] = {"py_modules": [str(Path(__file__).resolve().parents[1])]}
        elif cfg.num_cpus:
            init["num_cpus"] = cfg.num_cpus
        ray.init(**init)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        resources = ray.cluster_resources()
        gpus_needed = cfg.gpus_per_actor * cfg.actors
        if gpus_needed and ours and address == "local" and resources.get("GPU", 0) < gpus_needed:
            # The local instance this job started never grows: Ray would wait for the GPUs forever.
            raise PipelineError(
                f"--gpus-per-actor {cfg.gpus_per_actor:g} x {cfg.actors} actor(s) needs {gpus_needed:g} GPU, and the "
                f"local Ray instance has {resources.get('GPU', 0):g}; run on a machine (or --address a cluster) "
                "with GPUs, or leave --gpus-per-actor out"
            )
        cfg.log(
            f"ray {ray.__version__}: {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU; "
            f"model '{model.name}' version {model.version} on {provider}; {source.rows:,} rows in "
            f"{len(source.units)} read units; {cfg.actors}"
            f"{f'-{cfg.max_actors}' if cfg.max_actors and cfg.max_actors != cfg.actors else ''} actor(s) x "
            f"{cfg.cpus_per_actor:g} CPU" + (f" + {cfg.gpus_per_actor:g} GPU" if cfg.gpus_per_actor else "")
        )
        pool = (
            ray.data.ActorPoolStrategy(size=cfg.actors)
            if not cfg.max_actors or cfg.max_actors == cfg.actors
            else ray.data.ActorPoolStrategy(min_size=cfg.actors, max_size=cfg.max_actors)
        )
        kwargs = {
            "model": model,
            "model_bytes": ray.put(Path(model.path).read_bytes()),
            "source": source,
            "labels": None if labels is None else ray.put(labels),
        }
        units = ray.data.from_items(source.units, override_num_blocks=min(len(source.units), 10_000))
        predictions = units.map_batches(
            OnnxPredictor,
            fn_constructor_kwargs=kwargs,
            compute=pool,
            batch_size=1,
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor or None,
        )
        staging = out / f".{PREDICTIONS}-{uuid.uuid4().hex[:8]}"
        run_started = time.monotonic()
        # Writing needs no CPU of its own: all of a small node's CPUs may be actors.
        predictions.write_parquet(str(staging), ray_remote_args={"num_cpus": 0}, concurrency=max(1, cfg.actors))
        seconds = time.monotonic() - run_started
    finally:
        if ours:
            ray.shutdown()

    final = out / PREDICTIONS
    if final.exists():
        shutil.rmtree(final)
    (out / SUMMARY).unlink(missing_ok=True)
    os.replace(staging, final)
    files = sorted(final.glob("*.parquet"))
    written = sum(_parquet_rows(f) for f in files)
    if written != source.rows:
        raise PipelineError(f"wrote {written:,} rows for {source.rows:,} inputs")
    summary: dict[str, Any] = {
        "complete": True,
        "format": FORMAT,
        "task": "classify",
        "engine": "ray",
        "rows": source.rows,
        "input": source.describe(),
        "labels": str(cfg.labels) if cfg.labels else source.label_column,
        "model": {"name": model.name, "version": model.version, "sha256": model.sha256, "provider": provider},
        "actors": {
            "min": cfg.actors,
            "max": cfg.max_actors or cfg.actors,
            "cpus_each": cfg.cpus_per_actor,
            "gpus_each": cfg.gpus_per_actor,
            "intra_op_threads": model.intra_op_threads,
        },
        "batch_size": cfg.batch_size,
        "rows_per_read": cfg.rows_per_read,
        "ray": {
            "version": ray.__version__,
            "address": address if ours else "connected before the job",
            "cpus": resources.get("CPU", 0),
            "gpus": resources.get("GPU", 0),
        },
        "seconds": round(seconds, 3),
        "images_per_second": round(source.rows / max(seconds, 1e-9), 1),
        "total_seconds": round(time.monotonic() - started, 3),
        "outputs": {f"{PREDICTIONS}/{f.name}": f.stat().st_size for f in files},
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if has_labels:
        names = list(model.class_names)
        matrix = _confusion(final, len(names))
        accuracy = report.accuracy(matrix)
        summary.update(accuracy=round(accuracy, 6), correct=int(np.trace(matrix)))
        (out / "confusion_matrix.csv").write_bytes(report.confusion_csv(matrix, names))
        skipped = report.confusion_png(
            matrix,
            names,
            out / "confusion_matrix.png",
            f"{model.name} v{model.version}: accuracy {accuracy:.2%} on {source.rows:,} rows",
        )
        if skipped:
            cfg.log(f"confusion_matrix.png skipped: {skipped}; confusion_matrix.csv has the counts")
        cfg.log(f"accuracy {accuracy:.4f} ({int(np.trace(matrix)):,}/{source.rows:,} correct)")
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / SUMMARY)
    return summary


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


# -- CLI -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.jobs.ray_pipeline",
        description="Classify images on a Ray cluster (Ray Data): IDX / .npy / Parquet in, Parquet out; "
        "the same model repository and results as python -m service.jobs --local. Needs the ray extra.",
    )
    add = parser.add_argument
    add(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="an IDX file (gzip or not), a .npy file, or Parquet files / a folder of them",
    )
    add(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output folder: predictions/*.parquet, summary.json (+ confusion_matrix.csv with labels)",
    )
    add(
        "--labels",
        type=Path,
        help="true labels of an IDX/.npy input (IDX idx1 or 1-D .npy): accuracy, confusion matrix",
    )
    add("--model", default=DEFAULT_MODEL, help=f"model name [default {DEFAULT_MODEL}]")
    add("--version", type=int, default=0, help="model version [default: the latest, pinned for the job]")
    add(
        "--model-repository",
        type=Path,
        help="model repository [default: $SERVING_MODEL_REPOSITORY, else the bundled models/]",
    )
    add(
        "--provider",
        choices=["auto", "cpu", "cuda"],
        help="onnxruntime provider in the actors "
        "[default: $SERVING_PROVIDER, else cuda with --gpus-per-actor, else auto]",
    )
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument(
        "--actors", type=int, default=1, help="predictor actors (one onnxruntime session each) [default 1]"
    )
    ray_group.add_argument(
        "--max-actors", type=int, help="let Ray Data grow the pool from --actors up to this many [default: fixed pool]"
    )
    ray_group.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs reserved per actor, also its onnxruntime intra-op threads [default 1]",
    )
    ray_group.add_argument(
        "--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (e.g. 1 or 0.5) [default 0]"
    )
    ray_group.add_argument(
        "--address",
        help="join an existing Ray cluster (e.g. auto, or ray://head:10001) [default: $RAY_ADDRESS, "
        "else a local Ray instance]",
    )
    ray_group.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance [default: all]")
    tuning = parser.add_argument_group("batching and input")
    tuning.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"rows per onnxruntime call [default {DEFAULT_BATCH}, the batch job's --chunk-size]",
    )
    tuning.add_argument(
        "--rows-per-read",
        type=int,
        default=DEFAULT_UNIT,
        help=f"IDX/.npy rows an actor reads at a time (a multiple of --batch-size) [default {DEFAULT_UNIT}]",
    )
    tuning.add_argument("--image-column", default="image", help="Parquet column holding the images [default image]")
    tuning.add_argument(
        "--label-column", help="Parquet column holding true labels [default: 'label' when every file has one]"
    )
    tuning.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the full read of an IDX/.npy input before the job (its header is still checked)",
    )
    tuning.add_argument("--overwrite", action="store_true", help="replace an earlier result in --output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = PipelineConfig(
        inputs=args.inputs,
        output=args.output,
        labels=args.labels,
        model=args.model,
        version=args.version,
        model_repository=args.model_repository,
        provider=args.provider,
        actors=args.actors,
        max_actors=args.max_actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        batch_size=args.batch_size,
        rows_per_read=args.rows_per_read,
        image_column=args.image_column,
        label_column=args.label_column,
        address=args.address,
        num_cpus=args.num_cpus,
        overwrite=args.overwrite,
        verify=args.verify,
    )

    def fail(message: str, status: int) -> int:
        print(f"ray-pipeline: error: {message}", file=sys.stderr)
        return status

    try:
        summary = run_pipeline(cfg)
    except InputError as exc:
        return fail(f"bad input: {exc}", 2)
    except PipelineError as exc:
        return fail(str(exc), 1)
    except KeyboardInterrupt:
        return fail("interrupted; nothing final was written (re-run the same command)", 130)
    except Exception as exc:  # a task or actor failed inside Ray: RayTaskError, ActorDiedError, ...
        if not type(exc).__module__.startswith("ray."):
            raise
        return fail(f"the Ray job failed: {exc}", 1)
    print(
        f"done: {summary['rows']:,} rows in {summary['seconds']:.1f} s ({summary['images_per_second']:,.0f} images/s; "
        f"{summary['total_seconds']:.1f} s with Ray start-up and checks); results in {args.output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "InputPlan",
    "ModelPlan",
    "OnnxPredictor",
    "PipelineConfig",
    "PipelineError",
    "build_parser",
    "main",
    "plan_input",
    "resolve_model",
    "run_pipeline",
]
