"""Which contended messages this worker parks, and when it unparks the next.

The consumer keeps at most ``limit + 1`` waiters per key (``CAP_EXTRA``) in its
waiting room, where a watch wakes them the moment the key is freed: enough
to hand the key over at ZooKeeper's speed. Every other contended message of
the key is parked on the broker (:mod:`.parking`), and so is a room waiter
whose ``mutex_requeue_delay`` passed (instead of cycling through the broker
once per delay). A fresh arrival for a key whose park queue may hold
messages parks too, behind them: the park queue is the key's line.

A key is *flagged* while its park queue may hold messages: this worker parked
one, or received one that was unparked (``x-mutex-unparked``: the line goes
on). For a flagged key the worker refills its room from the park queue, one
message per free place, whenever a waiter leaves it for the pool and
whenever the key's watch fires with nobody waiting here; an empty park queue
clears the flag. Consumer thread only.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Dict, Optional

from . import messages
from .handoff import handed
from .parking import UNPARKED_HEADER, ParkingLot
from .waiting import waiting_since

__all__ = ('ParkedKeys',)

logger = logging.getLogger('celery_mutex_bootstep.gate')

CAP_EXTRA = 1
_RETRY_UNPARK = 1.0


class ParkedKeys:
    def __init__(self, consumer: Any, lot: ParkingLot, room: Any, metrics: Any,
                 max_held: int, later: Callable[..., Any]) -> None:
        self.c = consumer
        self.lot = lot
        self.room = room
        self.metrics = metrics
        self.max_held = max_held
        self.later = later
        self.flagged: Dict[str, Any] = {}   # digest -> MutexKey
        self._unparking: Counter = Counter()
        self._registered: set = set()
        self._types: Dict[str, Optional[str]] = {}  # digest -> its park queue's x-queue-type
        self.in_flight = 0                  # parks not yet confirmed
        # Messages of a key this worker holds outside the line: in the room, and
        # (the gate says) asking ZooKeeper or waiting for a pool process.
        self.here: Callable[[str], int] = room.count
        self.generation = 0
        lot.known = lambda: tuple(self.flagged)

    @staticmethod
    def unparked(req: Any) -> bool:
        """Taken from the key's line (handed over here, or moved to its queue by
        a sweep): its place in the line was kept, it does not queue again."""
        return handed(req.message) or bool((req.message.headers or {}).get(UNPARKED_HEADER))

    def cap(self, key: Any) -> int:
        return key.policy.limit + CAP_EXTRA

    def arrived(self, req: Any, key: Any) -> None:
        """An unparked message means its key's line goes on: follow it here,
        whether it waits or, the key being free, runs at once (a line a sweep
        restarted would otherwise move one message per sweep)."""
        if self.unparked(req) and key.digest not in self.flagged:
            self._flag(key, messages.origin_queue(self.c, req.message))

    def queue_behind(self, req: Any, key: Any) -> bool:
        """A fresh arrival for a flagged key waits its turn in the park queue."""
        if key.digest in self.flagged:
            return not self.unparked(req)
        return False

    def should_park(self, req: Any, key: Any, asking: int = 0, tried: bool = False) -> bool:
        """Park rather than hold in the room (``req`` is contended).

        ``asking``: earlier arrivals of the key whose first try is still out;
        each has a room place kept, so a later arrival never takes it.
        ``tried``: ``req`` is such an arrival, answered: its place was kept
        (even if later arrivals were parked meanwhile, it is ahead of them).
        """
        if len(self.room) >= self.max_held:
            return True
        if self.unparked(req):
            return False
        if tried:
            return self.room.count(key.digest) >= self.cap(key)
        return (key.digest in self.flagged
                or self.room.count(key.digest) + asking >= self.cap(key))

    def park(self, req: Any, key: Any) -> None:
        digest = key.digest
        origin = messages.origin_queue(self.c, req.message)
        queue_type = self._flag(key, origin)
        self.in_flight += 1
        req._mutex_park_generation = self.generation
        waiting_since(req)  # its wait began now, unless it waited here or parked before
        self.lot.park(req, digest, origin, queue_type, self._parked)
        if digest not in self._registered:
            self._registered.add(digest)
            self.lot.register(digest, [self.lot.leases.path_for(s) for s in key.slots],
                              queue_type, mutex=getattr(key.policy, 'name', None))

    def _flag(self, key: Any, origin: Optional[str]) -> Optional[str]:
        self.flagged[key.digest] = key
        if key.digest not in self._types:
            self._types[key.digest] = self._queue_type(origin)
        return self._types[key.digest]

    def _parked(self, req: Any, ok: bool) -> None:
        self.in_flight -= 1
        if getattr(req, '_mutex_park_generation', None) != self.generation:
            return  # its channel is gone: the broker has requeued the original
        if ok:
            self.metrics.inc('parked')
            messages.ack(req, self.c.connection_errors)
        else:
            messages.reject(req, self.c.connection_errors, requeue=True)

    def refill(self, digest: str) -> None:
        """Take as many of ``digest``'s line as the room has places for, each
        handed straight to this consumer (:mod:`.handoff`)."""
        key = self.flagged.get(digest)
        if key is None:
            return
        while self.here(digest) + self._unparking[digest] < self.cap(key):
            self._unparking[digest] += 1
            self.lot.take(digest, self._types.get(digest), self._taken)

    def _taken(self, digest: str, got: Any) -> None:
        self._unparking[digest] -= 1
        if self._unparking[digest] <= 0:
            del self._unparking[digest]
        if got not in (None, False):
            self.metrics.inc('unparked')
            handler = getattr(getattr(self.c, 'task_consumer', None), 'on_message', None)
            try:
                handler(got)  # as if the broker had delivered it here
            except Exception:
                logger.exception('mutex: could not take a message of %s; it goes back '
                                 'to the head of its line', digest[:12])
                got.reject_log_error(logger, self.c.connection_errors, requeue=True)
        elif got is False:
            if not self._unparking.get(digest):
                self.flagged.pop(digest, None)  # its line is empty
                self._registered.discard(digest)
        else:
            self.later(_RETRY_UNPARK, self.refill, digest)

    def _queue_type(self, origin: Optional[str]) -> Optional[str]:
        """Park queues of quorum queues are quorum queues (replicated alike)."""
        queue = (getattr(self.c.app.amqp, 'queues', None) or {}).get(origin)
        return (getattr(queue, 'queue_arguments', None) or {}).get('x-queue-type')

    def info(self) -> Dict[str, Any]:
        return {'parked_keys': sorted(self.flagged), 'parking': self.in_flight}
