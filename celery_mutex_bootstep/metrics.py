"""Counters and a hold-time histogram, readable by ``celery inspect mutex_leases``
and, with the ``prometheus`` extra, exported to Prometheus with gauges of what
waits (``GAUGES``; labelled by worker only: keys are unbounded)."""
from __future__ import annotations

import bisect
import logging
import threading
from typing import Any, Callable, Dict, List, Optional

__all__ = ('MutexMetrics', 'HOLD_BUCKETS', 'GAUGES', 'start_prometheus', 'prometheus_address')

logger = logging.getLogger(__name__)

COUNTERS = ('acquired', 'contended', 'requeued', 'republished', 'skipped',
            'unavailable', 'refused', 'released', 'overran', 'lost', 'parked', 'unparked',
            'wait_timeout', 'superseded', 'replaced')
# Seconds; the last bucket is +Inf.
HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0)
# celery_mutex_<name>: help (values from MutexMetrics.gauges, see waiting_summary.py).
GAUGES = {
    'waiting': "Messages waiting for their key in this worker's consumer",
    'parked_keys': 'Keys whose park queue this worker follows',
    'parked_messages': 'Messages in the park queues this worker follows, as last counted '
                       '(a key followed by several workers counts in each)',
    'oldest_wait_seconds': 'Seconds the longest-waiting message known to this worker '
                           'has waited for its key (0: none waits)',
}


class MutexMetrics:
    """Thread-safe enough for counters bumped from the consumer and pool threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._hold_buckets: List[int] = [0] * (len(HOLD_BUCKETS) + 1)
        self._hold_sum = 0.0
        # Set by the step: the gauges' current values (called on the exporter's thread).
        self.gauges: Optional[Callable[[], Dict[str, float]]] = None

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    def held_for(self, seconds: float) -> None:
        with self._lock:
            self._hold_buckets[bisect.bisect_left(HOLD_BUCKETS, seconds)] += 1
            self._hold_sum += seconds

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            cumulative, total = [], 0
            for count in self._hold_buckets:
                total += count
                cumulative.append(total)
            return {
                'counters': dict(self.counts),
                'hold_seconds': {
                    'buckets': {('+Inf' if i == len(HOLD_BUCKETS) else str(HOLD_BUCKETS[i])): c
                                for i, c in enumerate(cumulative)},
                    'count': total, 'sum': round(self._hold_sum, 6),
                },
            }


# How many ports after ``mutex_prometheus_port`` a worker tries when it is taken:
# several workers on one host share one setting and each ends up on its own port.
PORT_TRIES = 16

# One exporter per process: the step's start() runs again on every broker
# reconnect, and a second registration of the same metric names would raise
# (prometheus_client's "Duplicated timeseries").
_exporter: Dict[str, Any] = {}
_exporter_lock = threading.Lock()


def prometheus_address() -> Optional[str]:
    """``host:port`` this process serves its metrics on, or None."""
    return _exporter.get('address')


def start_prometheus(metrics: MutexMetrics, port: int, worker: Optional[str] = None,
                     tries: int = PORT_TRIES) -> Optional[str]:
    """Serve the metrics on the first free port of ``port .. port+tries-1``.

    Returns the ``host:port`` served on, or None (prometheus_client missing or no
    free port). Never raises: a metrics failure must not become a consumer error,
    which Celery would treat as a broker connection error and restart the consumer.
    """
    with _exporter_lock:
        if 'address' in _exporter:
            return _exporter['address']
        try:
            return _start(metrics, port, worker, tries)
        except Exception as exc:  # never into the consumer
            logger.error('mutex: Prometheus exporter not started: %r', exc)
            return None


def _start(metrics: MutexMetrics, port: int, worker: Optional[str], tries: int) -> Optional[str]:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
    except ImportError:
        logger.warning('mutex: mutex_prometheus_port is set but prometheus-client is not '
                       'installed (pip install celery-mutex-bootstep[prometheus])')
        return None

    class Collector:
        def collect(self) -> Any:
            snap = metrics.snapshot()
            for name, value in snap['counters'].items():
                family = CounterMetricFamily(f'celery_mutex_{name}',
                                             f'Mutex leases: {name}', labels=['worker'])
                family.add_metric([worker or ''], value)
                yield family
            hist = snap['hold_seconds']
            family = HistogramMetricFamily('celery_mutex_hold_seconds',
                                           'Time a lease was held', labels=['worker'])
            family.add_metric([worker or ''], list(hist['buckets'].items()), hist['sum'])
            yield family
            values = metrics.gauges() if metrics.gauges is not None else {}
            for name, help_text in GAUGES.items():
                if name in values:
                    gauge = GaugeMetricFamily(f'celery_mutex_{name}', help_text,
                                              labels=['worker'])
                    gauge.add_metric([worker or ''], values[name])
                    yield gauge

    # A private registry: the global REGISTRY may hold the application's own
    # metrics, and its process/platform collectors are not ours to serve.
    registry = CollectorRegistry()
    registry.register(Collector())
    last: Optional[BaseException] = None
    for candidate in range(port, port + max(1, tries)):
        try:
            start_http_server(candidate, registry=registry)
        except OSError as exc:  # taken: another worker on this host
            last = exc
            continue
        address = f'0.0.0.0:{candidate}'
        _exporter['address'] = address
        logger.info('mutex: Prometheus metrics on http://%s/metrics', address)
        return address
    logger.error('mutex: Prometheus exporter not started: ports %d-%d are all taken (%r)',
                 port, port + max(1, tries) - 1, last)
    return None
