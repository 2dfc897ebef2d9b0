"""``mutex_timeout``: holders past it are killed, one sweep for all of them.

Every quarter second while leases are held (a timer of the consumer's loop), a
holder that has run longer than its ``mutex_timeout`` on the monotonic clock
(an NTP step must not kill holders) is SIGKILLed through :meth:`Holders._kill`;
its lease is released once the process has exited, and an ``acks_late``
message goes back to the broker (else the result says why). While the loop is
stopped for a warm shutdown, a thread of its own keeps sweeping: the pool is
still finishing its tasks. A pool that runs tasks in the worker process
(threads, solo) cannot kill one: it is logged and its lease stays until it
returns. A mixin of :class:`~.holders.Holders`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from . import messages
from .exceptions import MutexTimeout

if TYPE_CHECKING:
    from .lease import Lease
    from .options import MutexPolicy

__all__ = ('OverrunSweep',)

logger = logging.getLogger('celery_mutex_bootstep.gate')  # as holders.py

_SWEEP_EVERY = 0.25


class OverrunSweep:
    """The overrun sweep of :class:`~.holders.Holders`."""

    def _sweep_overruns(self) -> None:
        """Every quarter second while leases are held: kill holders past their
        ``mutex_timeout`` (one timer for all, not one per task)."""
        self._sweep_timer = None
        if not self._granted:
            return
        self._kill_overruns()
        self._sweep_timer = self.inbox.later(_SWEEP_EVERY, self._sweep_overruns)

    def _sweep_at_shutdown(self) -> None:
        """Warm shutdown: the consumer's loop (and its timer) stopped while the
        pool finishes its tasks, so a thread of its own keeps ``mutex_timeout``."""
        def sweep() -> None:
            while self._granted and self._thread is None:
                try:
                    self._kill_overruns()
                except Exception:
                    logger.exception('mutex: overrun sweep at shutdown failed')
                time.sleep(_SWEEP_EVERY)
        threading.Thread(target=sweep, name='mutex-overruns', daemon=True).start()

    def _kill_overruns(self) -> None:
        # Durations on the monotonic clock: an NTP step must not kill holders.
        now = time.monotonic()
        for lease, req in list(self._granted.items()):
            policy = self._policy_of.get(lease)
            started = req.__dict__.get('_mutex_started')
            if (policy is not None and started and not lease.released
                    and now - started > policy.timeout
                    and not req.__dict__.get('_mutex_overran')):
                req._mutex_overran = True
                self._overran(req, lease, policy)

    def _overran(self, req: Any, lease: Lease, policy: MutexPolicy) -> None:
        pid = getattr(req, 'worker_pid', None)
        what = f'{policy.name} lease {lease.key[:12]}'
        if not pid or pid == os.getpid():
            logger.warning('mutex: %s[%s] overran its mutex_timeout of %gs on %s; this '
                           'pool cannot kill it, so its lease stays until it returns',
                           req.name, req.id, policy.timeout, what)
            return
        self.metrics.inc('overran')
        logger.warning('mutex: %s[%s] overran its mutex_timeout of %gs on %s: killing '
                       'pool process %s (SIGKILL); the lease is released once it exited',
                       req.name, req.id, policy.timeout, what, pid)
        if req.acknowledged:  # the message is gone: say why in the result
            messages.store_failure(req, MutexTimeout(req.name, policy.timeout))
        else:  # acks_late: the message goes back to the broker
            messages.reject(req, self.c.connection_errors, requeue=True)
        self._kill(req, lease)
