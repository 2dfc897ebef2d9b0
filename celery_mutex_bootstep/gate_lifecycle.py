"""The gate's side of the consumer's and the session's lifecycle.

What happens to waiting messages, leases and watches when the consumer starts,
stops (warm shutdown or a broker reconnect) and when the ZooKeeper session
comes, goes or is lost. A mixin of :class:`~.gate.MutexGate`, apart so that the
gate's module reads as the path of one request.
"""
from __future__ import annotations

import logging
from typing import Optional

from celery.worker import state as worker_state

from .handoff import handed

__all__ = ('GateLifecycle',)

logger = logging.getLogger('celery_mutex_bootstep.gate')


class GateLifecycle:
    """Start, stop and session events of :class:`~.gate.MutexGate`."""

    def on_lost(self, leases: list, wait_until: Optional[float]) -> None:
        """The session's leases are gone (the deadline's or kazoo's thread):
        kill their holders here and now, the bookkeeping follows on the
        consumer thread whenever it runs."""
        stopped = self.holders.stopper.stop(leases, wait_until=wait_until)
        self._post(self.holders.session_lost, stopped)

    def start(self) -> None:
        """The consumer (re)started."""
        self.inbox.attach()
        self.holders.resume()
        if self.parked is not None:
            # Watches set before a broker reconnect call back into the old
            # generation, which ignores them; the room's waiters, which would set
            # new ones, may not come back (Redis: not before visibility_timeout).
            # So every followed line gets a watch now: a free key refills at once.
            for key in list(self.parked.flagged.values()):
                self._watch(key)
            self.parked.lot.start()

    def on_session(self, state: str) -> None:
        """The ZooKeeper session changed state (consumer thread)."""
        if state != 'connected':
            self._watching.clear()  # kazoo re-arms watches only within a session
            return
        # and the keys marked for exclusive waiters here, which may have left since
        digests = {h.key.digest for h in self.room} | self.leases.shared.marked()
        if self.parked is not None:
            digests.update(self.parked.flagged)
        for digest in sorted(digests):
            self._wake(digest, self._generation)
            key = self.parked.flagged.get(digest) if self.parked is not None else None
            if key is not None:
                self._watch(key)

    def stop(self) -> None:
        """The consumer stops: on shutdown hand waiting messages back now.

        On a broker reconnect their channel is gone and the broker requeues
        them itself; answers still on their way are ignored.
        """
        from celery.bootsteps import RUN
        reconnect = self.c.blueprint.state == RUN
        if self.parked is not None and not reconnect:
            # Warm shutdown: parks already asked for finish, and their originals are
            # acknowledged while the channel is open (else both would run).
            self.parked.lot.wait_idle(3.0)
            self.inbox.drain()
        self._generation += 1
        self._in_flight.clear()
        if self.parked is not None:
            self.parked.generation += 1
        self.room.stop_polling()
        self.holders.pause(reconnect=reconnect)
        self._watching.clear()
        in_line = self.places.reset()
        for req in in_line:
            worker_state.task_ready(req)
        waiting = in_line + [held.req for held in self.room.clear(restore_qos=False)]
        for req in waiting:
            if reconnect and not handed(req.message):
                continue  # their channel is gone: the broker requeues them
            self.metrics.inc('requeued')
            try:
                self.endings.reject(req, requeue=True)
            except Exception as exc:
                logger.warning('mutex: could not hand back %s: %r', req.id, exc)
