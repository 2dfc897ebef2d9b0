"""Contended messages held in the consumer, per key, in arrival order.

A held message costs no pool process and, up to ``max_held`` per worker, no
prefetch slot either: holding it raises the prefetch count by one, as Celery
does for ETA tasks, and handing it back lowers it again. Past ``max_held`` a
held message keeps its own prefetch slot, so a hot key can never pull its
whole queue into one worker's memory: at most ``prefetch + max_held``
messages are in the worker.

Each held message has a deadline (its ``mutex_requeue_delay``); the owner is
told when it passes (``on_expire``) and decides what happens to the message.
Consumer thread only.

A message's wait is counted from when it first waited for its key, on any
worker: a parked copy carries that time in ``x-mutex-waiting-since``
(:func:`waiting_since`), so an unparked message keeps its age.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional

from celery.worker import state as worker_state

from .waiting_summary import waiting_summary

__all__ = ('Held', 'WaitingRoom', 'SINCE_HEADER', 'waiting_since')

SINCE_HEADER = 'x-mutex-waiting-since'
_REVOKE_POLL = 0.1


def waiting_since(req: Any) -> float:
    """When ``req``'s message first waited for its key (wall clock): its header
    if it was parked before, else now; remembered on the request."""
    since = getattr(req, '_mutex_waiting_since', None)
    if since is None:
        now = time.time()
        headers = getattr(getattr(req, 'message', None), 'headers', None) or {}
        value = headers.get(SINCE_HEADER)
        # A time from the future (another host's clock) would be a negative wait.
        since = float(value) if isinstance(value, (int, float)) and 0 < value <= now else now
        try:
            req._mutex_waiting_since = since
        except AttributeError:  # a request without a __dict__ (tests)
            pass
    return since


class Held:
    """One held message: its request, key, and state."""

    __slots__ = ('req', 'key', 'seq', 'entry', 'compensated', 'since', 'waiting_since',
                 'trying', 'gone')

    def __init__(self, req: Any, key: Any, compensated: int, seq: int = 0) -> None:
        self.req = req
        self.key = key
        self.seq = seq
        self.entry: Any = None
        self.compensated = compensated  # what holding it added to the prefetch count
        self.since = time.monotonic()          # in this room
        self.waiting_since = waiting_since(req)  # first wait, wall clock, any worker
        self.trying = False   # an acquisition for it is in flight
        self.gone = False     # left the room (granted, handed back, revoked)


class WaitingRoom:
    def __init__(self, consumer: Any, max_held: int,
                 on_expire: Callable[[Held], None],
                 later: Callable[..., Any]) -> None:
        self.c = consumer
        self.later = later  # later(delay, fun, *args): a timer entry
        self.max_held = max_held
        self.on_expire = on_expire
        self._by_key: Dict[str, Deque[Held]] = OrderedDict()
        self._count = 0
        self._compensated = 0
        self._revoke_timer: Any = None

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Held]:
        for queue in list(self._by_key.values()):
            yield from list(queue)

    def has_waiters(self, digest: str) -> bool:
        return digest in self._by_key

    def count(self, digest: str) -> int:
        queue = self._by_key.get(digest)
        return len(queue) if queue else 0

    def first(self, digest: str) -> Optional[Held]:
        queue = self._by_key.get(digest)
        return queue[0] if queue else None

    def hold(self, req: Any, key: Any, delay: float, seq: int = 0,
             compensate: bool = True) -> Held:
        """Hold ``req``; ``seq`` is its arrival number, which orders the key's
        waiters (an answer from ZooKeeper can come back after a later arrival
        already joined the queue). ``compensate=False``: it takes no prefetch
        slot (handed over from a park queue), so none is added for it."""
        compensated = 0
        if compensate and self._compensated < self.max_held:
            # kombu caps the increment at max_prefetch (worker_eta_task_limit)
            # but not the decrement: undo exactly what was applied.
            qos = self.c.qos
            before = qos.value
            compensated = max(0, (qos.increment_eventually() or 0) - (before or 0))
            if compensated:
                self._compensated += 1
        held = Held(req, key, compensated, seq)
        queue = self._by_key.setdefault(key.digest, deque())
        i = len(queue)
        while i and queue[i - 1].seq > seq:
            i -= 1
        queue.insert(i, held)
        self._count += 1
        held.entry = self.later(delay, self._expired, held)
        return held

    def leave(self, held: Held) -> bool:
        """Take ``held`` out of the room; False if it already left."""
        if held.gone:
            return False
        held.gone = True
        queue = self._by_key.get(held.key.digest)
        if queue is not None:
            try:
                queue.remove(held)
            except ValueError:
                pass
            if not queue:
                del self._by_key[held.key.digest]
        self._count -= 1
        if held.entry is not None:
            try:
                self.c.timer.cancel(held.entry)
            except Exception:
                pass
            held.entry = None
        if held.compensated:
            self._compensated -= 1
            self.c.qos.decrement_eventually(held.compensated)
        return True

    def rearm(self, held: Held, delay: float) -> None:
        """Keep ``held`` waiting another ``delay``."""
        if not held.gone:
            held.entry = self.later(delay, self._expired, held)

    def _expired(self, held: Held) -> None:
        if not held.gone:
            held.entry = None
            self.on_expire(held)

    def summary(self, parked: Any = None) -> Dict[str, Any]:
        """Per key, what waits here and parked (:mod:`.waiting_summary`)."""
        return waiting_summary(self, parked)

    def clear(self, *, restore_qos: bool) -> List[Held]:
        """Everyone leaves at once (consumer stop); returns who was held."""
        everyone = list(self)
        for held in everyone:
            if not restore_qos:
                held.compensated = 0  # Celery restores the prefetch count itself
            self.leave(held)
        self._compensated = 0
        return everyone

    def poll_revoked(self) -> None:
        """While messages wait, drop revoked ones at once (as revoked)."""
        if self._revoke_timer is not None or not self._count:
            return

        def check() -> None:
            self._revoke_timer = None
            # Request.revoked() checks ids, stamped headers and expiry, and
            # announces the revoke; ask it only when something can be revoked.
            if (worker_state.revoked or getattr(worker_state, 'revoked_stamps', None)
                    or any(h.req.expires for h in self)):
                for held in list(self):
                    if held.req.revoked():
                        self.leave(held)
            self.poll_revoked()
        self._revoke_timer = self.later(_REVOKE_POLL, check)

    def stop_polling(self) -> None:
        if self._revoke_timer is not None:
            self._revoke_timer.cancel()
            self._revoke_timer = None
