"""Stopping the holders of a lost session in time, without the consumer's event loop.

Guarantee: when the session deadline passes (see session.py), every pool
process that runs, or may be about to run, a task under a lease of that
session is SIGKILLed and seen gone before the deadline thread closes the
session, and so before the ZooKeeper server could expire it and let another
worker acquire. On kazoo's LOST (the server already expired it) they are
killed at once.

This runs on the thread that noticed (the deadline thread, kazoo's thread),
never on the consumer thread: that thread sits in kombu's reconnect loop
while the broker is away, and a host whose network fails loses the broker and
ZooKeeper together. Bookkeeping (handing messages back, releasing, logging,
events) follows on the consumer thread whenever it runs again.

Which process: ``req.worker_pid`` once the pool accepted the request; before
that, the pool process prefork wrote the job to (which, with Celery's default
fair scheduling, is idle and runs nothing else). A request still in prefork's
outbound buffer has no process yet: the pool processes refuse it when it
starts, since the shared validity record (validity.py) was zeroed first.

A request is marked (``_mutex_killed``) before its process is killed, so the
pool's WorkerLostError for it neither acknowledges an ``acks_late`` message,
nor stores FAILURE, nor releases the lease before the bookkeeping handed the
message back (holders.py): the message goes back and the task runs again.

Failure cases: pools whose tasks run in the worker's own process (threads,
solo) cannot be stopped this way; the step refuses them for guarded tasks
unless ``mutex_on_session_loss='continue'`` (see options.py).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .processes import process_alive

__all__ = ('HolderStopper', 'holder_pid')

logger = logging.getLogger('celery_mutex_bootstep.gate')

_EXIT_POLL = 0.005


def holder_pid(req: Any) -> Optional[int]:
    """The pool process that runs ``req`` or was handed it; None if none yet
    (or the task runs in this process)."""
    pid = getattr(req, 'worker_pid', None)
    if not pid:
        result = req.__dict__.get('_mutex_apply_result')
        process = getattr(result, '_write_to', None)
        pid = getattr(process, 'pid', None)
    if not pid or pid == os.getpid():
        return None
    return pid


class HolderStopper:
    """The registry of granted requests, readable from any thread."""

    def __init__(self, on_session_loss: str = 'kill') -> None:
        self.on_session_loss = on_session_loss
        self._lock = threading.Lock()
        self._holders: Dict[Any, Any] = {}  # lease -> request

    def add(self, lease: Any, req: Any) -> None:
        with self._lock:
            self._holders[lease] = req

    def discard(self, lease: Any) -> None:
        with self._lock:
            self._holders.pop(lease, None)

    def stop(self, leases: List[Any], *, wait_until: Optional[float] = None
             ) -> List[Tuple[Any, Any, Optional[int]]]:
        """SIGKILL the processes holding ``leases``; with ``wait_until``
        (monotonic), wait until they are gone or that moment passed.

        Returns ``(lease, request, pid)`` for each registered lease (pid None
        when nothing was killed). Any thread; never touches the pool object.
        """
        with self._lock:
            found = [(lease, self._holders.get(lease)) for lease in leases]
        stopped: List[Tuple[Any, Any, Optional[int]]] = []
        killed: List[int] = []
        for lease, req in found:
            if req is None:
                continue
            # 'continue': running holders finish; one not started yet is
            # refused by its pool process (the validity record is zeroed).
            pid = None if self.on_session_loss == 'continue' else holder_pid(req)
            if pid is not None:
                req._mutex_killed = True  # before the kill: see the module doc
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
                except OSError as exc:
                    logger.error('mutex: could not kill pool process %s: %r', pid, exc)
            stopped.append((lease, req, pid))
        if killed and wait_until is not None:
            alive = list(killed)
            while alive and time.monotonic() < wait_until:
                alive = [pid for pid in alive if process_alive(pid)]
                if alive:
                    time.sleep(_EXIT_POLL)
            if alive:
                logger.error('mutex: pool processes %s were still alive at the session '
                             'deadline', alive)
        return stopped
