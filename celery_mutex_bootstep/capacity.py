"""No hoarding: a lease is taken only for a request a pool process is about to run.

A worker that took the lease of every guarded request it prefetched would sit
on keys while their requests wait in the pool's buffer for a busy process, and
workers with idle processes would find those keys held. So the gate counts the
pool's places: the pool runs ``processes`` requests at once (prefork: its
current number of processes, which the autoscaler moves); every request the
gate hands to the pool, guarded or not, takes a place until it ends, and so
does every lease attempt in flight (a win goes straight to the pool). There are
``processes + mutex_lease_ahead`` places; by default one lease ahead per process,
so a process that finishes finds its next request leased and never waits for a
ZooKeeper round trip (the uncontended cost), and a worker holds at most two
leases per process. ``mutex_lease_ahead = 0`` takes a lease only when a process
is free.

While no place is free:

* a guarded request that arrives waits here, in arrival order, without a lease
  and without asking ZooKeeper; it keeps its prefetch slot, as it would in the
  pool's buffer;
* a key's waiter woken by its watch is remembered (the watch is spent) and
  tries first when a place frees: it stands at the head of its key's line.

Places are counted from the requests' own end callbacks (the ones Celery uses to
report success, failure, revoke and cancel; :mod:`.request_end`), not asked of
the pool. A request prefork drops on a broker reconnect never reports its end;
``reset`` forgets the requests that had not started, so the count heals.
Pools with no known size (or an unknown pool object) are never held back.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from .request_end import watch_request_end

__all__ = ('PoolPlaces',)


def _nothing() -> None:
    pass


class PoolPlaces:
    """Free places in the pool, and who waits for one (consumer thread)."""

    def __init__(self, consumer: Any, post: Callable[..., None],
                 on_free: Callable[[], None], ahead: Optional[int] = None) -> None:
        self.c = consumer
        self.ahead = ahead
        self._post = post  # request ends may come on pool threads (threads pool)
        self._on_free = on_free
        self._in_pool: Dict[int, Any] = {}
        self._trying: Dict[int, Any] = {}
        #: guarded requests waiting for a place: (request, key, arrival number)
        self.line: Deque[Tuple[Any, Any, int]] = deque()
        self._woken: Dict[str, None] = {}  # digests, in wake order

    def processes(self) -> Optional[int]:
        pool = getattr(self.c, 'pool', None)
        try:
            n = pool.num_processes
        except Exception:  # not started yet, or not a Celery pool
            n = getattr(pool, 'limit', None)
        return n if isinstance(n, int) and n > 0 else None

    def free(self) -> bool:
        n = self.processes()
        if n is None:
            return True
        return len(self._in_pool) + len(self._trying) < n + (n if self.ahead is None else self.ahead)

    def pending(self) -> bool:
        return bool(self.line or self._woken)

    # -- lease attempts and requests in the pool ---------------------------

    def trying(self, req: Any) -> None:
        self._trying[id(req)] = req

    def tried(self, req: Any) -> None:
        """The attempt answered (the caller pumps the line afterwards)."""
        self._trying.pop(id(req), None)

    def entered(self, req: Any, watch: bool = True) -> Callable[[], None]:
        """``req`` is handed to the pool: its place is taken until it ends.
        Returns the call that frees it; ``watch=False``: the caller calls it
        from the end hook it already has on the request."""
        rid = id(req)
        self._in_pool[rid] = req
        post, left = self._post, self._left

        def ended() -> None:
            post(left, rid, req)
        if watch:
            watch_request_end(req, ended=ended, killed=ended, started=_nothing)
        return ended

    def _left(self, rid: int, req: Any) -> None:
        if self._in_pool.get(rid) is req:
            del self._in_pool[rid]
            self._on_free()

    # -- waiting for a place ----------------------------------------------

    def wait(self, req: Any, key: Any, seq: int) -> None:
        self.line.append((req, key, seq))

    def woken(self, digest: str) -> None:
        self._woken[digest] = None

    def next_woken(self) -> Optional[str]:
        for digest in self._woken:
            del self._woken[digest]
            return digest
        return None

    def reset(self) -> list:
        """The consumer stopped: lease attempts are void, and requests the pool
        never started were dropped by it. Returns the requests waiting here."""
        self._trying.clear()
        self._woken.clear()
        for rid, req in list(self._in_pool.items()):
            if not getattr(req, 'time_start', None):
                del self._in_pool[rid]
        waiting = [req for req, _, _ in self.line]
        self.line.clear()
        return waiting
