"""Per key, what waits for it in this worker: for ``celery inspect
mutex_leases``, ``celery mutex list`` and the Prometheus gauges.

A key's messages wait in this worker's consumer (the waiting room) or parked
on the broker. For each key with waiters here, or whose park queue this worker
follows, the summary gives:

``waiting``             messages waiting in this worker's room;
``parked``              messages in the key's park queue, as this worker last
                        knew it (:mod:`.parked_view`); None when it does not
                        follow one for the key;
``oldest_wait``         seconds the oldest of them has waited since it first
                        waited, on any worker (parked ones: only those this
                        worker parked are known here);
``oldest_parked_wait``  the same, over the parked ones this worker knows of.

Built on the consumer thread from what is in memory: no network call.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional

__all__ = ('waiting_summary', 'waiting_gauges', 'ConsumerGauges', 'SUMMARY_MAX')

# Keys listed per reply (the longest waits first); the totals count them all.
SUMMARY_MAX = 100


def _age(now: float, since: Optional[float]) -> Optional[float]:
    return None if since is None else round(max(0.0, now - since), 3)


def waiting_summary(room: Any, parked: Any, now: Optional[float] = None) -> Dict[str, Any]:
    """``{'waiting_keys': [...], 'waiting_totals': {...}}`` for ``gate.info()``."""
    now = time.time() if now is None else now
    keys: Dict[str, Dict[str, Any]] = {}
    for held in room:
        entry = keys.setdefault(held.key.digest, _entry(held.key))
        entry['waiting'] += 1
        since = held.waiting_since
        entry['_room'] = since if entry['_room'] is None else min(entry['_room'], since)
    if parked is not None:
        lines = parked.lot.view.lines()
        for digest, key in list(parked.flagged.items()):
            count, since = lines.get(digest, (None, None))
            entry = keys.setdefault(digest, _entry(key))
            entry['parked'], entry['_parked'] = count, since
    listed: List[Dict[str, Any]] = []
    for digest, entry in keys.items():
        room_since, parked_since = entry.pop('_room'), entry.pop('_parked')
        if not entry['waiting'] and entry['parked'] == 0:
            continue  # a followed park queue found empty: nothing waits
        starts = [s for s in (room_since, parked_since) if s is not None]
        entry['oldest_wait'] = _age(now, min(starts)) if starts else None
        entry['oldest_parked_wait'] = _age(now, parked_since)
        listed.append(entry)
    listed.sort(key=lambda e: (-(e['oldest_wait'] or 0.0), e['key']))
    totals = {
        'keys': len(listed),
        'waiting': sum(e['waiting'] for e in listed),
        'parked_keys': len(parked.flagged) if parked is not None else 0,
        'parked': sum(e['parked'] or 0 for e in listed),
        'oldest_wait': max((e['oldest_wait'] or 0.0 for e in listed), default=0.0),
    }
    return {'waiting_keys': listed[:SUMMARY_MAX], 'waiting_totals': totals}


def _entry(key: Any) -> Dict[str, Any]:
    describe = getattr(key, 'describe', None)
    return {'key': key.digest, 'mutex': describe() if callable(describe) else None,
            'waiting': 0, 'parked': None, '_room': None, '_parked': None}


def waiting_gauges(room: Any, parked: Any) -> Dict[str, float]:
    """The Prometheus gauges (no per-key label: keys are unbounded)."""
    totals = waiting_summary(room, parked)['waiting_totals']
    return {'waiting': totals['waiting'], 'parked_keys': totals['parked_keys'],
            'parked_messages': totals['parked'],
            'oldest_wait_seconds': totals['oldest_wait']}


class ConsumerGauges:
    """Gauge values for a scrape, which runs on the exporter's thread: computed on
    the consumer thread, which owns the waiting room, through ``post``. A
    consumer too busy to answer within ``wait`` seconds gets the last values
    served instead of stalling the scrape (and no second request queued behind
    the first: a stopped consumer would pile them up)."""

    def __init__(self, compute: Callable[[], Dict[str, float]],
                 post: Callable[..., None], wait: float = 1.0) -> None:
        self.compute = compute
        self.post = post
        self.wait = wait
        self._last: Dict[str, float] = {}
        self._asked: Optional[threading.Event] = None
        self._lock = threading.Lock()

    def __call__(self) -> Dict[str, float]:
        with self._lock:
            done, ask = self._asked, False
            if done is None or done.is_set():
                done = self._asked = threading.Event()
                ask = True
        if ask:
            self.post(self._run, done)
        done.wait(self.wait)
        return dict(self._last)

    def _run(self, done: threading.Event) -> None:
        try:
            self._last = self.compute()
        finally:
            done.set()
