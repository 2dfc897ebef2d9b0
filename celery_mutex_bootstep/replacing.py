"""``mutex_contended='replace'``: the newest call wins.

For "recompute the latest state, abandon the stale run". A replace call that
finds its key held stops the holder when the holder is older, and waits in
the consumer (one waiter per key, as coalescing keeps it: an older waiter is
superseded, see :mod:`.supersede`); the watch on the lease node wakes it once
the stopped holder's lease is released, and it runs.

"Newer" is by arrival at a worker's gate, compared with the time the holder
was granted its lease (``acquired_at`` in the lease node, the holder host's
clock): a holder granted before the call arrived is older and is stopped; one
granted after it (another worker's older waiter that won the freed key) is
not, and the call waits for it. Across hosts this compares two wall clocks.

How a holder is stopped, as an overrun one is (:mod:`.holders`): SIGKILL of its
pool process, its lease released only once the process has exited. It ends
REVOKED with the reason ``replaced by <task id> (mutex_contended=replace)``,
stored before its message is acknowledged, a WARNING naming both tasks and
the key, ``mutex-replaced`` and ``task-revoked`` events. (One handed to the
pool but not started yet is killed the moment it starts, as an operator
release does it, and Celery stores its reason, ``terminated``.) A holder on this worker is stopped at once; one on
another worker (the lease node names it) gets the ``mutex_release`` remote
control command with ``task_id`` and ``replaced_by``, sent from a thread (a
broker publish is a network call the consumer never waits on); that worker
stops it the same way. A worker without the step, or an older release
that does not know ``replaced_by``, does not stop its holder: the call then
waits, as ``'requeue'`` would.

Only pools that can kill a task (prefork) are accepted: on threads or solo a
holder cannot be stopped (refused at start). Consumer thread only.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Callable

from celery.worker import state as worker_state

from .payload import parse_lease_data

__all__ = ('Replacing', 'REPLACE_REASON')

logger = logging.getLogger('celery_mutex_bootstep.gate')

REPLACE_REASON = 'replaced by {} (mutex_contended=replace)'
_REMEMBER = 1024  # holders asked to stop (one request each, not one per wake)


class Replacing:
    def __init__(self, consumer: Any, leases: Any, holders: Any, verdicts: Any,
                 post: Callable[..., None], metrics: Any) -> None:
        self.c = consumer
        self.metrics = metrics
        self.leases = leases
        self.holders = holders
        self.verdicts = verdicts
        self.post = post
        self.hostname = getattr(consumer, 'hostname', None)
        self._stopping: 'OrderedDict[str, None]' = OrderedDict()

    def contended(self, req: Any, key: Any) -> None:
        """``req`` waits for ``key``: stop the key's holder if it is older."""
        arrived = req.__dict__.setdefault('_mutex_arrived', time.time())
        for lease, holder in list(self._granted()):
            if lease.key == key.digest and holder is not req:
                if lease.acquired_at <= arrived:
                    self.stop_here(holder.id, req.id, key.describe())
                return
        try:  # held elsewhere: the lease node names its holder
            result = self.leases.client.get_async(self.leases.path_for(key.digest))
        except Exception:  # no session: it waits, and asks again when woken
            return
        result.rawlink(lambda r: self.post(self._read, req, key, arrived, r))

    def _read(self, req: Any, key: Any, arrived: float, result: Any) -> None:
        try:
            raw = result.get(block=False)[0]
        except Exception:  # freed meanwhile (NoNodeError), or no answer
            return
        data = parse_lease_data(raw)
        task_id, worker, granted = data.get('task_id'), data.get('worker'), data.get('acquired_at')
        if (not task_id or task_id == req.id or task_id in self._stopping
                or not isinstance(granted, (int, float)) or granted > arrived):
            return
        if worker == self.hostname:
            return self.stop_here(task_id, req.id, key.describe())
        self._remember(task_id)
        logger.warning('mutex: %s[%s] replaces %s on %s (mutex_contended=replace): asking '
                       '%s to stop it', req.name, req.id, task_id, key.describe(), worker)
        req.send_event('mutex-replaced', key=key.digest, mutex=key.describe(),
                       replaced=task_id, worker=worker)
        app = self.c.app

        def ask() -> None:
            app.control.broadcast('mutex_release', destination=[worker] if worker else None,
                                  arguments={'task_id': task_id, 'replaced_by': req.id})
        self.verdicts.call(ask)

    def stop_here(self, task_id: str, by: str, what: str = '') -> list:
        """Stop this worker's holder ``task_id`` (replaced by ``by``)."""
        if task_id in self._stopping:
            return []
        self._remember(task_id)
        reason = REPLACE_REASON.format(by)
        done = []
        for lease, req in self._granted():
            if req.id != task_id or lease.released:
                continue
            if req.time_start is None:
                # Not started (it may sit in a pool process's pipe): killed the
                # moment it starts, reported by Celery as revoked ('terminated').
                done += self.holders.release_matching(task_id=task_id)
                continue
            logger.warning('mutex: %s[%s] %s on %s: killing it (SIGKILL through the pool); '
                           'its lease is released once its process exited',
                           req.name, req.id, reason, what or lease.key[:12])
            # As an overrun is killed: marked, so no Celery handler reports the
            # lost process; REVOKED with the reason is stored here instead.
            self.holders._kill(req, lease)
            worker_state.task_ready(req)
            self.metrics.inc('replaced')
            self.verdicts.revoked(req, reason, (('mutex-replaced', {
                'key': lease.key, 'by': by}),))
            done.append({'key': lease.key, 'task_id': req.id, 'action': 'killed'})
        return done

    def _granted(self) -> list:
        # Read-only look at the holders' table (holders.py owns it).
        return list(self.holders._granted.items())

    def _remember(self, task_id: str) -> None:
        self._stopping[task_id] = None
        while len(self._stopping) > _REMEMBER:
            self._stopping.popitem(last=False)
