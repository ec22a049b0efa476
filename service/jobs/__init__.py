"""Batch inference: run a whole input file through a model, resumably, against a server or in-process.

``python -m service.jobs classify t10k-images-idx3-ubyte.gz --labels t10k-labels-idx1-ubyte.gz
--output out/ --server localhost:8001`` (or ``--local``). Modules:

* :mod:`.inputs`   — IDX / .npy / PNG-folder images and CSV populations, checked whole, read in chunks;
* :mod:`.backends` — remote (``ClassifyStream`` / ``PredictProfit`` via :mod:`service.client`) or
  local (the server's own :class:`~service.core.local.LocalModel` on onnxruntime);
* :mod:`.job`      — preallocated outputs + an atomically replaced journal: resumable, no row lost or
  duplicated, ``summary.json`` written last marks a finished result;
* :mod:`.progress` — progress bar with rate and ETA; :mod:`.report` — accuracy, confusion matrix.
"""

from __future__ import annotations

from ..core.tasks import DEFAULT_MODELS
from .backends import BackendError, LocalBackend, RemoteBackend
from .inputs import InputError, open_images, open_populations, read_labels
from .job import Job, JobConfig, JobError

__all__ = [
    "DEFAULT_MODELS",
    "BackendError",
    "InputError",
    "Job",
    "JobConfig",
    "JobError",
    "LocalBackend",
    "RemoteBackend",
    "open_images",
    "open_populations",
    "read_labels",
]
