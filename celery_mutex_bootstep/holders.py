"""Granted leases and the requests holding them, until each lease is released.

A lease is released once its request has ended and its task can no longer
run:

* the request ended normally (success, failure, Retry, Reject, Ignore, revoked
  before it started): at once, on whatever thread the pool reported it;
* the pool killed the task (hard time limit, revoke with terminate, worker
  lost, our own SIGKILL): Celery reports that before the child is gone, so
  the release waits until the child process has exited;
* the request never started and never will (prefork dropped it on a broker
  reconnect, which it does without a callback): after a short grace period.

A holder that outlives its ``mutex_timeout`` is SIGKILLed by this worker and
only then released. When the ZooKeeper session is lost, holders are stopped
the same way (or left to finish with ``mutex_on_session_loss='continue'``)
and their messages handed back, so the task runs again from the start.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional

from celery.exceptions import TaskRevokedError
from celery.worker import state as worker_state

from . import messages
from .exceptions import MutexTimeout
from .lease import Lease, ZooKeeperLeases
from .metrics import MutexMetrics
from .options import MutexPolicy, MutexSettings
from .processes import process_alive
from .request_end import watch_request_end

__all__ = ('Holders',)

logger = logging.getLogger('celery_mutex_bootstep.gate')

_EXIT_POLL = 0.02
_SWEEP_EVERY = 0.25
_DROPPED_GRACE = 2.0


class Holders:
    """The requests this worker runs under a lease (consumer thread, except
    ``release``, which the pool calls on its own threads)."""

    def __init__(self, consumer: Any, leases: ZooKeeperLeases, metrics: MutexMetrics,
                 settings: MutexSettings, post: Callable[..., None]) -> None:
        self.c = consumer
        self.leases = leases
        self.metrics = metrics
        self.settings = settings
        self.post = post  # run on the consumer thread, in order
        self._granted: Dict[Lease, Any] = {}   # lease -> request
        self._policy_of: Dict[Lease, MutexPolicy] = {}
        self._sweep_timer: Any = None

    def __len__(self) -> int:
        return len(self._granted)

    def request_of(self, lease: Lease) -> Any:
        return self._granted.get(lease)

    def add(self, req: Any, lease: Lease, policy: MutexPolicy) -> None:
        """``req`` goes to the pool holding ``lease``: release it when it ends."""
        self._granted[lease] = req
        self._policy_of[lease] = policy
        watch_request_end(
            req,
            ended=lambda: self.release(lease),
            killed=lambda: self.release_after_exit(req, lease),
            started=lambda: self._started(req, lease),
            refused=lambda: self._refused_in_pool(req, lease),
        )
        self._check_before_pool(req, lease)
        if self._sweep_timer is None:
            self._sweep_overruns()

    def _check_before_pool(self, req: Any, lease: Lease) -> None:
        """Wrap the request's hand-over to the pool process (consumer thread).

        A request can wait between grant and hand-over (for a free process).
        If the session's deadline passed meanwhile (a frozen worker, say), it
        is not handed over. Otherwise it carries ``valid_until``, the deadline
        on the machine's monotonic clock: a pool process that only starts it
        after that refuses it (see failclosed.py).
        """
        execute_using_pool = req.execute_using_pool
        deadline = self.leases.deadline

        def execute_using_pool_(pool: Any, **kwargs: Any) -> Any:
            until = deadline.deadline()
            if lease.lost or until is None or time.monotonic() >= until:
                self.stop_holder(req, lease, 'its session may have expired before it '
                                 'reached a pool process')
                raise TaskRevokedError(req.id)
            req._request_dict['mutex_lease']['valid_until'] = until
            result = execute_using_pool(pool, **kwargs)
            req._mutex_apply_result = result  # where prefork wrote the job
            return result

        req.execute_using_pool = execute_using_pool_

    def _refused_in_pool(self, req: Any, lease: Lease) -> None:
        # The pool process refused it (valid_until passed): hand it back once.
        if not req.__dict__.get('_mutex_stopped'):
            req._mutex_stopped = True
            self._hand_back(req)

    def _started(self, req: Any, lease: Lease) -> None:
        # The pool's thread. A lease lost before the pool started the task
        # (the session ended while it sat in the pool's queue): stop it now.
        if lease.lost:
            self.post(self.stop_holder, req, lease, 'its lease was lost before it started')

    # -- releasing ---------------------------------------------------------

    def release(self, lease: Lease) -> None:
        # Any thread (prefork: the hub; threads pool: an executor; solo: inline).
        self._granted.pop(lease, None)
        self._policy_of.pop(lease, None)
        if self.leases.release(lease):
            self.metrics.inc('released')
            self.metrics.held_for(time.monotonic() - lease.acquired_monotonic)

    def release_after_exit(self, req: Any, lease: Lease) -> None:
        pid = getattr(req, 'worker_pid', None)
        if not pid or pid == os.getpid():
            return self.release(lease)  # solo/threads: the task has returned
        self.c.call_soon(self._wait_exit, lease, pid, time.monotonic())

    def _wait_exit(self, lease: Lease, pid: int, since: float) -> None:
        if lease.released:
            return
        if not process_alive(pid):
            return self.release(lease)
        if time.monotonic() - since > 30:
            logger.warning('mutex: pool process %s is still alive 30s after its task '
                           'was killed; lease %s stays held until it exits', pid, lease.path)
            since = float('inf')
        self.c.timer.call_after(_EXIT_POLL, self.c.call_soon,
                                (self._wait_exit, lease, pid, since))

    # -- stopping holders --------------------------------------------------

    def _sweep_overruns(self) -> None:
        """Every quarter second while leases are held: kill holders past their
        ``mutex_timeout`` (one timer for all, not one per task)."""
        self._sweep_timer = None
        if not self._granted:
            return
        now = time.time()
        for lease, req in list(self._granted.items()):
            policy = self._policy_of.get(lease)
            started = req.time_start
            if (policy is not None and started and not lease.released
                    and now - started > policy.timeout
                    and not req.__dict__.get('_mutex_overran')):
                req._mutex_overran = True
                self._overran(req, lease, policy)
        self._sweep_timer = self.c.timer.call_after(
            _SWEEP_EVERY, self.c.call_soon, (self._sweep_overruns,))

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

    def _kill(self, req: Any, lease: Lease) -> None:
        """SIGKILL the pool process running ``req`` (cannot be caught).

        Through ``Request.cancel``, as Celery does on a lost broker connection:
        the pool reports the end as cancelled, so nothing else is stored or
        acked, and the lease is released once the process has exited.
        """
        try:
            req.cancel(self.c.pool, signal='SIGKILL', emit_retry=False)
        except Exception as exc:
            logger.error('mutex: could not kill pool process %s: %r', req.worker_pid, exc)
        self.release_after_exit(req, lease)

    def session_lost(self, leases: List[Lease]) -> None:
        """These leases went with the ZooKeeper session: stop their holders."""
        for lease in leases:
            self._policy_of.pop(lease, None)
            req = self._granted.pop(lease, None)
            if req is None or lease.released:
                continue
            self.metrics.inc('lost')
            req.send_event('mutex-lost', key=lease.key)
            if req.time_start is None:
                self.stop_holder(req, lease, 'its lease was lost before it started')
            elif self.settings.on_session_loss == 'continue':
                logger.error('mutex: %s[%s] lost its lease with the ZooKeeper session; it '
                             'continues WITHOUT exclusivity (mutex_on_session_loss=continue)',
                             req.name, req.id)
            else:
                self.stop_holder(req, lease, 'its lease was lost with the ZooKeeper session')

    def stop_holder(self, req: Any, lease: Lease, why: str) -> None:
        """Never run without a lease: kill it or keep it from starting, and
        hand its message back so it runs again from the start elsewhere."""
        started = req.time_start is not None
        pid = getattr(req, 'worker_pid', None)
        killable = started and pid and pid != os.getpid()
        if not req.__dict__.get('_mutex_stopped'):
            req._mutex_stopped = True
            logger.error('mutex: %s[%s] %s: %s; it will run again from the start', req.name,
                         req.id, why, 'killing it' if killable else
                         'stopping it' if not started else 'this pool cannot kill it')
            self._hand_back(req)
        if not started:
            # Still in the pool's queue: execute_using_pool will refuse it.
            req._already_revoked = True
            worker_state.task_ready(req)
            self.release(lease)
        elif killable:
            self._kill(req, lease)

    def _hand_back(self, req: Any) -> None:
        """The task runs again from the start: its message goes back."""
        if not req.acknowledged:
            messages.reject(req, self.c.connection_errors, requeue=True)
        elif messages.republish(self.c.app, req, self.c.connection_errors):
            self.metrics.inc('republished')
        else:
            logger.error('mutex: %s[%s] could not be republished: it will not run again',
                         req.name, req.id)

    def release_matching(self, *, key: Optional[str] = None, task_id: Optional[str] = None,
                         task: Optional[str] = None) -> list:
        """Operator release: kill the matching holders (SIGKILL through the pool,
        reported as revoked) so their leases are freed once they have exited;
        holders not started yet are revoked before they run."""
        done = []
        for lease, req in list(self._granted.items()):
            if not ((key and key in (lease.key, lease.path, lease.key.split('-')[0]))
                    or (task_id and req.id == task_id)
                    or (task and req.name == task)):
                continue
            if req.time_start is not None:
                logger.warning('mutex: releasing %s on request: killing %s[%s]',
                               lease.path, req.name, req.id)
                req.terminate(self.c.pool, signal='SIGKILL')
                action = 'killed'
            else:
                worker_state.revoked.add(req.id)
                req.revoked()  # announces it revoked; the release follows
                action = 'revoked'
            done.append({'key': lease.key, 'path': lease.path, 'task_id': req.id,
                         'task': req.name, 'action': action})
        return done

    # -- consumer lifecycle ------------------------------------------------

    def resume(self) -> None:
        """The consumer (re)started: watch running holders again."""
        if self._granted and self._sweep_timer is None:
            self._sweep_overruns()

    def pause(self, *, reconnect: bool) -> None:
        """The consumer stops. On a broker reconnect prefork drops the requests
        it had not started, without a word: their messages come back from the
        broker, their leases must go."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        if reconnect and type(self.c.pool).__module__.endswith('.prefork'):
            dropped = [(lease, req) for lease, req in list(self._granted.items())
                       if req.time_start is None]
            if dropped:
                self.c.timer.call_after(_DROPPED_GRACE, self.c.call_soon,
                                        (self._release_dropped, dropped))

    def _release_dropped(self, dropped: list) -> None:
        for lease, req in dropped:
            if req.time_start is not None or lease.released:
                continue  # it started after all: it ends the normal way
            req._already_revoked = True  # should it still reach the pool: refused
            worker_state.task_ready(req)
            process = getattr(req.__dict__.get('_mutex_apply_result'), '_write_to', None)
            if process is None:  # never written to a pool process: it cannot run
                logger.info('mutex: releasing %s: %s[%s] was dropped by the broker '
                            'reconnect and will be redelivered', lease.path, req.name, req.id)
                self.release(lease)
                continue
            # prefork forgot the job, but the process it was written to will
            # still run it: stop that process, release once it has exited.
            logger.warning('mutex: %s[%s] was dropped by the broker reconnect but sits in '
                           'pool process %s: killing it before releasing %s',
                           req.name, req.id, process.pid, lease.path)
            try:
                os.kill(process.pid, signal.SIGKILL)
            except OSError:
                pass
            self.c.call_soon(self._wait_exit, lease, process.pid, time.monotonic())
