"""Counters and a hold-time histogram, readable by ``celery inspect mutex_leases``
and, with the ``prometheus`` extra, exported to Prometheus."""
from __future__ import annotations

import bisect
import threading
from typing import Any, Dict, List, Optional

__all__ = ('MutexMetrics', 'HOLD_BUCKETS', 'start_prometheus')

COUNTERS = ('acquired', 'contended', 'requeued', 'republished', 'skipped',
            'unavailable', 'refused', 'released', 'overran', 'lost')
# Seconds; the last bucket is +Inf.
HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0)


class MutexMetrics:
    """Thread-safe enough for counters bumped from the consumer and pool threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._hold_buckets: List[int] = [0] * (len(HOLD_BUCKETS) + 1)
        self._hold_sum = 0.0

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


def start_prometheus(metrics: MutexMetrics, port: int, worker: Optional[str] = None) -> bool:
    """Serve the metrics on ``port`` if prometheus_client is installed."""
    try:
        from prometheus_client import start_http_server
        from prometheus_client.core import (REGISTRY, CounterMetricFamily,
                                            HistogramMetricFamily)
    except ImportError:
        return False

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

    REGISTRY.register(Collector())
    start_http_server(port)
    return True
