"""One /metrics page for every worker: each worker's page (its own ``Metrics`` registry, read over
the control channel when the supervisor is scraped) is parsed and added up.

* counters and histograms: the sum over workers, including the last values read from worker
  processes that have since exited, so a restart never makes a counter go backwards (what a
  worker killed with SIGKILL counted after its last scrape is lost with it);
* gauges: the sum over the workers running now (requests queued, batches in flight), except
  ``serving_model_loaded``: 1 only when every running worker reports the version loaded.

The worker's hot path is untouched: nothing is shared between processes until a scrape.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
#: (family name, sample name, labels)
Key = tuple[str, str, Labels]
#: Gauges that say "everywhere" rather than "in total".
ALL_WORKERS_GAUGES = frozenset({"serving_model_loaded"})
ADDED_UP = frozenset({"counter", "histogram"})


@dataclass
class Page:
    """One worker's metrics: each family's type and help, each sample's value."""

    families: dict[str, tuple[str, str]] = field(default_factory=dict)
    values: dict[Key, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Page:
        page = cls()
        for family in text_string_to_metric_families(text):
            page.families[family.name] = (family.type, family.documentation)
            for sample in family.samples:
                page.values[(family.name, sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return page

    def add_counts(self, other: Page) -> None:
        """Add ``other``'s counters and histograms to this page's (a worker that exited)."""
        for name, meta in other.families.items():
            if meta[0] in ADDED_UP:
                self.families.setdefault(name, meta)
        for key, value in other.values.items():
            if other.families[key[0]][0] in ADDED_UP:
                self.values[key] = self.values.get(key, 0.0) + value

    def total(self, sample: str) -> float:
        return sum(value for (_, name, _), value in self.values.items() if name == sample)


def merge(live: list[Page], retired: Iterable[Page]) -> list[Metric]:
    """The families of one page for the whole server (see the module docstring)."""
    families: dict[str, tuple[str, str]] = {}
    pages = [*retired, *live]
    for page in pages:
        for name, meta in page.families.items():
            families.setdefault(name, meta)
    values: dict[Key, float] = {}
    for page in pages:
        for key, value in page.values.items():
            kind = families[key[0]][0]
            if kind in ADDED_UP:
                values[key] = values.get(key, 0.0) + value
    for page in live:
        for key, value in page.values.items():
            kind = families[key[0]][0]
            if kind not in ADDED_UP and key[0] not in ALL_WORKERS_GAUGES:
                values[key] = values.get(key, 0.0) + value
    everywhere = {key for page in live for key in page.values if key[0] in ALL_WORKERS_GAUGES}
    for key in everywhere:
        values[key] = min(page.values.get(key, 0.0) for page in live)
    metrics: dict[str, Metric] = {}
    for (name, sample, labels), value in values.items():
        metric = metrics.get(name)
        if metric is None:
            kind, documentation = families[name]
            metric = metrics[name] = Metric(name, documentation, kind)
        metric.add_sample(sample, dict(labels), value)
    return list(metrics.values())
