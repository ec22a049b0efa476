"""Prometheus metrics of guarded rollout and capture, read from the controller when scraped (the
request path only adds to plain counters; docs/serving.md#metrics lists them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .state import CANARY, PRIMARY

if TYPE_CHECKING:
    from .controller import Rollout


class RolloutCollector(Collector):
    """``serving_rollout_*`` and ``serving_capture_*`` families."""

    def __init__(self, rollout: Rollout) -> None:
        self._rollout = rollout

    def describe(self) -> list[Any]:
        return []  # unchecked: names come from collect() at scrape time

    def collect(self) -> Iterator[Any]:
        rollout = self._rollout
        role = GaugeMetricFamily(
            "serving_rollout_role",
            "1 per model version with a rollout role (primary, shadow, canary)",
            labels=["model", "version", "role"],
        )
        share = GaugeMetricFamily(
            "serving_rollout_share",
            "Share of requests mirrored to the shadow, or routed to the canary",
            labels=["model", "version", "role"],
        )
        routed = CounterMetricFamily(
            "serving_rollout_routed_requests",
            "Unversioned requests routed between a primary and its canary, by arm, and how many failed "
            "(errors: server-side failures counted against the arm; a canary's are answered by the primary)",
            labels=["model", "version", "arm", "outcome"],
        )
        fallbacks = CounterMetricFamily(
            "serving_rollout_fallbacks",
            "Canary requests that failed and were answered by the primary",
            labels=["model", "version"],
        )
        mirrored = CounterMetricFamily(
            "serving_rollout_mirrored_requests",
            "Answered requests run again on another version (shadow, or the primary checking a canary), by outcome",
            labels=["model", "version", "outcome"],
        )
        dropped = CounterMetricFamily(
            "serving_rollout_mirror_dropped_requests",
            "Mirrored requests dropped before running: queue_full, queue_bytes, not_served",
            labels=["model", "reason"],
        )
        depth = GaugeMetricFamily("serving_rollout_mirror_queue_depth", "Mirrored requests waiting", labels=["model"])
        deaths = CounterMetricFamily(
            "serving_rollout_mirror_process_exits",
            "Mirror processes (--rollout-mirror process) that died under the server; each is started again",
            labels=["model"],
        )
        rows = CounterMetricFamily(
            "serving_rollout_compared_rows",
            "Rows answered by both versions of a pair and compared",
            labels=["model", "primary", "version"],
        )
        agreement = GaugeMetricFamily(
            "serving_rollout_agreement",
            "Agreement of a version with its primary, for the life of the pair: argmax (classifiers) or within "
            "the tolerance (regressions) share of rows; mean_abs_diff (mean |Δ| per row, |Δp| for classifiers); "
            "max_abs_diff; mean_relative_error (regressions)",
            labels=["model", "primary", "version", "measure"],
        )
        window = GaugeMetricFamily(
            "serving_rollout_canary_window",
            "What the canary's rules read now: agreement, error rates and p99 seconds over the window",
            labels=["model", "version", "measure"],
        )
        rollbacks = CounterMetricFamily(
            "serving_rollout_rollbacks", "Canaries rolled back, by rule", labels=["model", "version", "rule"]
        )
        promotions = CounterMetricFamily(
            "serving_rollout_promotions", "Versions promoted to primary", labels=["model", "version", "trigger"]
        )
        for name, state in list(rollout.models.items()):
            primary = state.primary_model.version if state.primary_model is not None else None
            if primary is not None:
                role.add_metric([name, str(primary), PRIMARY], 1)
            for kind, version, fraction in (
                ("shadow", state.shadow, state.shadow_share),
                (CANARY, state.canary, state.canary_share),
            ):
                if version is not None:
                    role.add_metric([name, str(version), kind], 1)
                    share.add_metric([name, str(version), kind], fraction)
            if state.canary is not None and primary is not None:
                for arm, version in ((PRIMARY, primary), (CANARY, state.canary)):
                    counts = state.arms[arm]
                    routed.add_metric([name, str(version), arm, "ok"], counts.routed - counts.failed)
                    routed.add_metric([name, str(version), arm, "error"], counts.failed)
                    window.add_metric([name, str(state.canary), f"{arm}_error_rate"], counts.error_rate)
                    window.add_metric([name, str(state.canary), f"{arm}_p99_seconds"], counts.p99())
                fallbacks.add_metric([name, str(state.canary)], state.fallbacks)
                if state.compared_rows:
                    window.add_metric(
                        [name, str(state.canary), "agreement"], state.compared_agreed / state.compared_rows
                    )
            for reason, count in state.mirror.dropped.items():
                dropped.add_metric([name, reason], count)
            depth.add_metric([name], state.mirror.depth)
            if state.mirror.process is not None:
                deaths.add_metric([name], state.mirror.process.deaths)
            for pair in list(state.pairs.values()):
                labels = [name, str(pair.primary), str(pair.other)]
                rows.add_metric(labels, pair.rows)
                figures = pair.as_dict()
                for measure in ("agreement", "mean_abs_diff", "max_abs_diff", "mean_relative_error"):
                    if figures.get(measure) is not None:
                        agreement.add_metric([*labels, measure], figures[measure])
        for (name, version, outcome), count in list(rollout.mirrored.items()):
            mirrored.add_metric([name, str(version), outcome], count)
        for (name, version, rule), count in list(rollout.rollbacks.items()):
            rollbacks.add_metric([name, str(version), rule], count)
        for (name, version, trigger), count in list(rollout.promotions.items()):
            promotions.add_metric([name, str(version), trigger], count)
        yield from (role, share, routed, fallbacks, mirrored, dropped, depth, deaths, rows, agreement, window)
        yield from (rollbacks, promotions)
        capture = rollout.capture
        if capture is not None:
            records = CounterMetricFamily(
                "serving_capture_records",
                "Captured requests by outcome: written, dropped (queue_full, queue_bytes), failed",
                labels=["outcome"],
            )
            records.add_metric(["written"], capture.written)
            for reason, count in capture.dropped.items():
                records.add_metric([f"dropped_{reason}"], count)
            records.add_metric(["failed"], capture.failed)
            yield records
            yield GaugeMetricFamily("serving_capture_queue_depth", "Captured requests waiting", value=capture.depth)
            yield CounterMetricFamily("serving_capture_files", "Capture files opened", value=capture.files_opened)
