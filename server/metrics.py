"""Prometheus metrics, on a registry of the app's own (several apps can live in one process).

The `model` label is bounded by what the operator registered, never by what clients send: the
base model and each registered adapter get their own; every per-request mixture (`adapters`) is
counted under MIXTURE_LABEL; an adapter's series go when it is deleted (or withdrawn, evicted),
found at each scrape by the `keep_model` test the app binds.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

MIXTURE_LABEL = "(mixture)"      # every per-request mixture; parentheses are never in an adapter id
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loramux_requests", "Requests finished, by model (adapter) and outcome",
                                ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("loramux_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("loramux_time_to_first_token_seconds", "Arrival to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loramux_time_per_output_token_seconds", "Mean gap between output tokens",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("loramux_request_latency_seconds", "Arrival to last token", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("loramux_batch_size", "Sequences per engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.queue_depth = Gauge("loramux_queue_depth", "Requests waiting to be scheduled", registry=r)
        self.running = Gauge("loramux_running_sequences", "Sequences in the running batch", registry=r)
        self.memory = Gauge("loramux_memory_bytes", "Resident bytes by kind", ["kind"], registry=r)
        self._series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}   # model label -> (metric, labels) used
        self._series_lock = threading.Lock()
        self._keep_model: Callable[[str], bool] = lambda _: True
        self._drain: Callable[[], list[int]] = list

    def of_model(self, metric: Any, model: str, *labels: str) -> Any:
        """`metric.labels(model, *labels)`, remembered so that `retain` can remove the series later."""
        with self._series_lock:
            self._series.setdefault(model, set()).add((metric, (model, *labels)))
        return metric.labels(model, *labels)

    def retain(self, keep_model: Callable[[str], bool]) -> None:
        """Remove every series of a `model` label that `keep_model` no longer keeps (a deleted adapter)."""
        with self._series_lock:
            gone = [m for m in self._series if not keep_model(m)]
            for model in gone:
                for metric, labels in self._series.pop(model):
                    try:
                        metric.remove(*labels)
                    except KeyError:
                        pass

    def bind(self, queue_depth: Callable[[], float], running: Callable[[], float],
             memory: dict[str, Callable[[], float]], drain_batch_sizes: Callable[[], list[int]],
             keep_model: Callable[[str], bool] | None = None) -> None:
        """Read live engine state at scrape time instead of pushing it every step; `keep_model`: whether
        a `model` label still names something served (checked at each scrape)."""
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)
        for kind, fn in memory.items():
            self.memory.labels(kind).set_function(fn)
        self._drain = drain_batch_sizes
        if keep_model is not None:
            self._keep_model = keep_model

    def gauge_from(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export a gauge read from live state at scrape time (e.g. KV blocks in use)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def count_from(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """Export a counter kept elsewhere (e.g. the registry's merges), read at scrape time."""
        self.registry.register(_ReadCounter(name, documentation, read))

    def labeled_from(self, name: str, documentation: str, kind: str, read: Callable[[], dict[str, float]],
                     label: str = "model") -> None:
        """Export a gauge or counter (`kind`) per label value, read at scrape time (e.g. per adapter)."""
        self.registry.register(_ReadLabeled(name, documentation, kind, read, label))

    def render(self) -> bytes:
        self.retain(self._keep_model)
        for size in self._drain():
            self.batch_size.observe(size)
        return generate_latest(self.registry)


class _ReadCounter:
    """A Prometheus collector for a monotonic count owned by another object (`<name>_total`)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, value=self.read())]


class _ReadLabeled:
    """A Prometheus collector for one value per label value, owned by another object."""

    def __init__(self, name: str, documentation: str, kind: str, read: Callable[[], dict[str, float]],
                 label: str) -> None:
        self.name, self.documentation, self.read, self.label = name, documentation, read, label
        self.family = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}[kind]

    def describe(self) -> list:
        return [self.family(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> list:
        metric = self.family(self.name, self.documentation, labels=[self.label])
        for value, number in self.read().items():
            metric.add_metric([value], number)
        return [metric]
