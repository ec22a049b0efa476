"""Guarded rollout inside the server (docs/rollout.md): shadow traffic, a canary with automatic
rollback, payload capture.

* :mod:`.config`: what a model's rollout is configured to be (setting, config.json, model control);
* :mod:`.controller`: :class:`~.controller.Rollout`, the per-model state, routing, rules and audit;
* :mod:`.mirror`: the bounded, low-priority queue that re-runs answered requests on another version;
* :mod:`.mirror_process`, :mod:`.mirror_worker`: the child process that runs the shadow's
  batches at idle CPU priority (``rollout_mirror=process``);
* :mod:`.compare`: agreement between two versions' outputs;
* :mod:`.capture`: requests and responses written to rotating JSON-lines files;
* :mod:`service.replay`: sends a capture file to a server or runs it in process.
"""
