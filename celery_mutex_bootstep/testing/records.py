"""Reading what tasks recorded in a Redis list: executions, intervals per key, overlaps.

The tasks append one JSON object at the start and one at the end of every execution::

    {"phase": "start" | "end", "task": name, "id": task id, "key": the mutex key's value,
     "t": time.time(), "pid": os.getpid(), "worker": request.hostname,
     "token": request.mutex_lease["token"], "retries": request.retries, ...}

and a test (or the demo) reads them back with :class:`Records` and asks :func:`overlaps`
whether two executions of one key ever ran at once. Needs the ``redis`` package.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Dict, List, Optional

__all__ = ['Execution', 'Records', 'any_overlap', 'by_key', 'overlaps']


@dataclass
class Execution:
    id: str
    task: str
    key: Optional[str]
    worker: str
    pid: int
    start: float
    end: Optional[float]  # None: never finished (killed, lost)
    token: Optional[int]
    extra: dict


class Records:
    """One record list in Redis (cleared when opened, unless ``clear=False``)."""

    def __init__(self, name: str, url: str, *, clear: bool = True) -> None:
        import redis  # not a dependency of the package: the test and demo extras
        self.name = name
        self.redis = redis.Redis.from_url(url)
        if clear:  # a fresh list per test: old records would be read as this run's
            self.redis.delete(name)

    def raw(self) -> List[dict]:
        return [json.loads(x) for x in self.redis.lrange(self.name, 0, -1)]

    def executions(self) -> List[Execution]:
        """One entry per start record, matched with the next end of the same run."""
        runs: List[Execution] = []
        open_runs: Dict[tuple, Execution] = {}
        for r in self.raw():
            ident = (r['id'], r['pid'], r.get('retries'))
            if r['phase'] == 'start':
                extra = {k: v for k, v in r.items() if k not in (
                    'phase', 'task', 'id', 'key', 'worker', 'pid', 't', 'token')}
                ex = Execution(r['id'], r['task'], r['key'], r['worker'], r['pid'],
                               r['t'], None, r.get('token'), extra)
                runs.append(ex)
                open_runs[ident] = ex
            elif r['phase'] == 'end' and ident in open_runs:
                open_runs.pop(ident).end = r['t']
        return runs

    def count(self, phase: str = 'start') -> int:
        return sum(1 for r in self.raw() if r['phase'] == phase)


def by_key(executions: List[Execution]) -> Dict[str, List[Execution]]:
    out: Dict[str, List[Execution]] = collections.defaultdict(list)
    for ex in executions:
        out[ex.key].append(ex)
    for runs in out.values():
        runs.sort(key=lambda e: e.start)
    return out


def overlaps(executions: List[Execution], *, open_end: float = float('inf')) -> List[tuple]:
    """Pairs of executions of one key whose intervals intersect.

    An execution without an end (killed) counts as running until ``open_end``.
    """
    found = []
    for key, runs in by_key(executions).items():
        if key is None:
            continue
        for i, a in enumerate(runs):
            a_end = a.end if a.end is not None else open_end
            for b in runs[i + 1:]:
                if b.start >= a_end:
                    break
                found.append((key, a, b))
    return found


def any_overlap(executions: List[Execution]) -> bool:
    return bool(overlaps(executions))
