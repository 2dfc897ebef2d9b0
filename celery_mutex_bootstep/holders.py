"""Granted leases and the requests holding them, until each lease is released.

A lease is released once its request has ended and its task can no longer
run:

* the request ended normally (success, failure, Retry, Reject, Ignore, revoked
  before it started): at once, on whatever thread the pool reported it;
* the pool killed the task (hard time limit, revoke with terminate, worker
  lost, our own SIGKILL): Celery reports that before the child is gone, so
  the release waits until the child process has exited;
* the request never started and never will (prefork dropped it on a broker
  reconnect, which it does without a callback): at once, or, if prefork had
  already written it to a pool process (which then runs it), once that
  process was killed and has exited.
* the request runs across a broker reconnect: as usual, when it ends (Celery
  before 5.7 forgets running jobs then; the step gives them back to the pool).

A holder that outlives its ``mutex_timeout`` is SIGKILLed by this worker (:mod:`.overruns`) and
only then released. When the ZooKeeper session is lost, :mod:`.stopping`
kills the holders first, on the thread that noticed; the bookkeeping here
follows on the consumer thread: their messages are handed back, so the task
runs again from the start (with ``mutex_on_session_loss='continue'`` running
holders finish instead).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional

from celery.exceptions import TaskRevokedError
from celery.worker import state as worker_state

from . import messages
from .handoff import handed
from .lease import Lease, ZooKeeperLeases
from .metrics import MutexMetrics
from .options import MutexPolicy, MutexSettings
from .overruns import OverrunSweep
from .processes import process_alive
from .republisher import Republisher
from .request_end import watch_request_end
from .stopping import HolderStopper, holder_pid

__all__ = ('Holders',)

logger = logging.getLogger('celery_mutex_bootstep.gate')

_EXIT_POLL = 0.02


def _keep_running_job(req: Any) -> None:
    """Celery before 5.7 forgets, on a broker reconnect, the jobs its pool
    processes are running (``AsynPool.flush`` clears its whole job cache,
    celery/celery#8541): their ends would never be reported, so their leases
    never released. Put a granted, running job back, so its end is reported."""
    job = req.__dict__.get('_mutex_apply_result')
    cache = getattr(job, '_cache', None)
    if cache is not None and not job.ready():
        cache.setdefault(job._job, job)


class Holders(OverrunSweep):
    """The requests this worker runs under a lease (consumer thread, except
    ``release``, which the pool calls on its own threads)."""

    def __init__(self, consumer: Any, leases: ZooKeeperLeases, metrics: MutexMetrics,
                 settings: MutexSettings, inbox: Any) -> None:
        self.c = consumer
        self.leases = leases
        self.metrics = metrics
        self.settings = settings
        self.inbox = inbox
        self.post = inbox.post  # run on the consumer thread, in order
        self._granted: Dict[Lease, Any] = {}   # lease -> request
        self._policy_of: Dict[Lease, MutexPolicy] = {}
        self._sweep_timer: Any = None
        # The consumer's thread while its loop runs (resume/pause); None: stopped.
        self._thread: Optional[int] = threading.get_ident()
        self.stopper = HolderStopper(settings.on_session_loss)
        self.republisher = Republisher(consumer.app, self.post, self._republished)

    def __len__(self) -> int:
        return len(self._granted)

    def request_of(self, lease: Lease) -> Any:
        return self._granted.get(lease)

    def add(self, req: Any, lease: Lease, policy: MutexPolicy,
            on_end: Callable[[], None] = lambda: None) -> None:
        """``req`` goes to the pool holding ``lease``: release it when it ends
        (and call ``on_end``, one hook per request is cheaper than two)."""
        self._granted[lease] = req
        self._policy_of[lease] = policy
        self.stopper.add(lease, req)

        def ended() -> None:
            # Free the place first: the request it admits asks for its lease in
            # this turn, and the release rides with that create (creates.py).
            on_end()
            self.release(lease, with_turn=threading.get_ident() == self._thread)
        watch_request_end(
            req,
            ended=ended,
            killed=lambda: (self._killed(req, lease), on_end()),
            started=lambda: self._started(req, lease),
            refused=lambda: self.post(self._refused_in_pool, req, lease),
            stopped=lambda: bool(req.__dict__.get('_mutex_killed')),
        )
        self._check_before_pool(req, lease)
        if self._sweep_timer is None:
            self._sweep_overruns()

    def _killed(self, req: Any, lease: Lease) -> None:
        """The pool reports that the process running ``req`` was killed.

        If the step killed it itself (``_mutex_killed``: session loss, overrun,
        a request dropped by a broker reconnect), whoever killed it hands its
        message back and releases the lease once the process exited. This
        report must not release it first: for a lost session it usually comes
        before the bookkeeping (the deadline thread posts that only once it saw
        the process gone), which skips a released lease, and the message would
        never go back (the task lost).
        """
        if not req.__dict__.get('_mutex_killed'):
            self.release_after_exit(req, lease)

    def _check_before_pool(self, req: Any, lease: Lease) -> None:
        """Wrap the request's hand-over to the pool process (consumer thread).

        A request can wait between grant and hand-over (for a free process).
        If the session's deadline passed meanwhile (a frozen worker, say), it
        is not handed over. Otherwise it carries the path of the shared
        validity record: the pool process checks, when it starts the task,
        that the lease's session is still certainly alive (see failclosed.py).
        """
        execute_using_pool = req.execute_using_pool
        deadline = self.leases.deadline

        def execute_using_pool_(pool: Any, **kwargs: Any) -> Any:
            until = deadline.deadline()
            if lease.lost or until is None or time.monotonic() >= until:
                self.stop_holder(req, lease, 'its session may have expired before it '
                                 'reached a pool process')
                raise TaskRevokedError(req.id)
            stamp = req._request_dict['mutex_lease']
            stamp['validity'] = deadline.validity.path
            stamp['epoch'] = deadline.validity.epoch
            result = execute_using_pool(pool, **kwargs)
            req._mutex_apply_result = result  # where prefork wrote the job
            return result

        req.execute_using_pool = execute_using_pool_

    def _refused_in_pool(self, req: Any, lease: Lease) -> None:
        # The pool process refused it (its session may be gone): hand it back once.
        if not req.__dict__.get('_mutex_stopped'):
            req._mutex_stopped = True
            logger.warning('mutex: %s[%s] was refused by its pool process: its session '
                           'may have expired before it started; it goes back', req.name, req.id)
            self._hand_back(req, lease)

    def _started(self, req: Any, lease: Lease) -> None:
        # The pool's thread. A lease lost before the pool started the task
        # (the session ended while it sat in the pool's queue): stop it now.
        req._mutex_started = time.monotonic()
        if lease.lost:
            self.post(self.stop_holder, req, lease, 'its lease was lost before it started')
        elif req.__dict__.get('_mutex_release_requested'):
            self.post(self._terminate, req, lease)

    # -- releasing ---------------------------------------------------------

    def release(self, lease: Lease, with_turn: bool = False) -> None:
        # Any thread (prefork: the hub; threads pool: an executor; solo: inline).
        self._granted.pop(lease, None)
        self._policy_of.pop(lease, None)
        self.stopper.discard(lease)
        if self.leases.release(lease, with_turn=with_turn):
            self.metrics.inc('released')
            self.metrics.held_for(time.monotonic() - lease.acquired_monotonic)

    def release_after_exit(self, req: Any, lease: Lease, pid: Optional[int] = None) -> None:
        pid = pid or getattr(req, 'worker_pid', None)
        if not pid or pid == os.getpid():
            return self.release(lease)  # solo/threads: the task has returned
        self.post(self._wait_exit, lease, pid, time.monotonic())

    def _wait_exit(self, lease: Lease, pid: int, since: float) -> None:
        if lease.released:
            return
        if not process_alive(pid):
            return self.release(lease)
        if time.monotonic() - since > 30:
            logger.warning('mutex: pool process %s is still alive 30s after its task '
                           'was killed; lease %s stays held until it exits', pid, lease.path)
            since = float('inf')
        self.inbox.later(_EXIT_POLL, self._wait_exit, lease, pid, since)

    # -- stopping holders --------------------------------------------------

    def _kill(self, req: Any, lease: Lease) -> None:
        """SIGKILL the pool process running ``req`` (cannot be caught).

        Marked first, so the pool's report of the lost process reaches no
        Celery handler (see request_end.py): nothing else is stored or acked;
        the caller already handed the message back or stored the outcome. Not
        through ``Request.cancel``, whose signature and side effects differ
        between Celery versions (before 5.7 it always stores a RETRY state). The lease
        is released once the process has exited.
        """
        pid = holder_pid(req)
        req._mutex_killed = True
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except OSError as exc:
                logger.error('mutex: could not kill pool process %s: %r', pid, exc)
        self.release_after_exit(req, lease, pid)

    def session_lost(self, stopped: list) -> None:
        """Bookkeeping after :mod:`.stopping` killed the holders of a lost
        session: ``(lease, request, killed pid or None)`` each."""
        for lease, req, pid in stopped:
            self._policy_of.pop(lease, None)
            self._granted.pop(lease, None)
            self.stopper.discard(lease)
            if lease.released:
                continue
            self.metrics.inc('lost')
            req.send_event('mutex-lost', key=lease.key)
            if pid is not None:
                self.stop_holder(req, lease, 'its lease was lost with the ZooKeeper '
                                 'session', killed=True)
            elif req.time_start is None:
                self.stop_holder(req, lease, 'its lease was lost before it started')
            elif self.settings.on_session_loss == 'continue':
                logger.error('mutex: %s[%s] lost its lease with the ZooKeeper session; it '
                             'continues WITHOUT exclusivity (mutex_on_session_loss=continue)',
                             req.name, req.id)
            else:
                self.stop_holder(req, lease, 'its lease was lost with the ZooKeeper session')

    def stop_holder(self, req: Any, lease: Lease, why: str, killed: bool = False) -> None:
        """Never run without a lease: kill it or keep it from starting, and
        hand its message back so it runs again from the start elsewhere."""
        started = req.time_start is not None or killed
        pid = holder_pid(req)
        killable = started and pid is not None and not killed
        if not req.__dict__.get('_mutex_stopped'):
            req._mutex_stopped = True
            logger.error('mutex: %s[%s] %s: %s; it will run again from the start', req.name,
                         req.id, why, 'killing it' if killable or killed else
                         'stopping it' if not started else 'this pool cannot kill it')
            self._hand_back(req, lease)
        if killed:
            worker_state.task_ready(req)
            self.release_after_exit(req, lease, pid)
        elif not started:
            # Still in the pool's queue: execute_using_pool will refuse it.
            req._already_revoked = True
            worker_state.task_ready(req)
            self.release(lease)
        elif killable:
            self._kill(req, lease)

    def _hand_back(self, req: Any, lease: Optional[Lease] = None) -> None:
        """The task runs again from the start: its message goes back (consumer
        thread). Unacknowledged: rejected to the broker, unless a quorum queue
        counted ``mutex_republish_after`` deliveries; acknowledged: a fresh copy,
        kept and retried until the broker takes it."""
        policy = self._policy_of.get(lease) if lease is not None else None
        limit = policy.republish_after if policy is not None else self.settings.republish_after
        if not req.acknowledged and not messages.delivery_limit_reached(req, limit):
            messages.reject(req, self.c.connection_errors, requeue=True)
        else:
            self.republish(req)

    def republish(self, req: Any) -> None:
        req._mutex_republishing = True
        req._mutex_origin = messages.origin_queue(self.c, req.message)
        self.republisher.submit(req)

    def _republished(self, req: Any) -> None:
        self.metrics.inc('republished')
        messages.ack(req, self.c.connection_errors)

    def _terminate(self, req: Any, lease: Lease) -> None:
        logger.warning('mutex: releasing %s on request: killing %s[%s] as it started',
                       lease.path, req.name, req.id)
        req.terminate(self.c.pool, signal='SIGKILL')

    def release_matching(self, *, key: Optional[str] = None, task_id: Optional[str] = None,
                         task: Optional[str] = None) -> list:
        """Operator release: kill the matching holders (SIGKILL through the pool,
        reported as revoked) so their leases are freed once they have exited.
        A holder handed to the pool but not started yet may still start (it
        may sit in a pool process's pipe): it keeps its lease and is killed
        the moment the pool reports it started."""
        done = []
        for lease, req in list(self._granted.items()):
            if not ((key and key in (lease.key, lease.path, lease.key.split('-')[0]))
                    or (task_id and req.id == task_id)
                    or (task and req.name == task)):
                continue
            if req.time_start is not None:
                self._terminate(req, lease)
                action = 'killed'
            else:
                req._mutex_release_requested = True
                action = 'killed when it starts'
            done.append({'key': lease.key, 'path': lease.path, 'task_id': req.id,
                         'task': req.name, 'action': action})
        return done

    # -- consumer lifecycle ------------------------------------------------

    def resume(self) -> None:
        """The consumer (re)started: watch running holders again."""
        self._thread = threading.get_ident()
        if self._granted and self._sweep_timer is None:
            self._sweep_overruns()

    def pause(self, *, reconnect: bool) -> None:
        """The consumer stops. On a broker reconnect prefork has just dropped
        the requests it had not started, without a word (``pool.flush()`` in
        ``Consumer.on_close``, which runs before the steps stop): their messages
        come back from the broker, their leases must go."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        # From now on releases go out at once: the loop that would end the turn
        # is stopped (warm shutdown: the pool's join reports ends on this thread).
        self._thread = None
        self.leases.creates.flush_deletes()
        if not reconnect and self._granted:
            self._sweep_at_shutdown()
        if reconnect and type(self.c.pool).__module__.endswith('.prefork'):
            # Whatever prefork forgot must not start, wherever it sits.
            self.leases.deadline.validity.next_epoch()
            dropped = [(lease, req) for lease, req in list(self._granted.items())
                       if req.time_start is None]
            for lease, req in list(self._granted.items()):
                if req.time_start is not None and not lease.released:
                    _keep_running_job(req)
            self._release_dropped(dropped)

    def _release_dropped(self, dropped: list) -> None:
        for lease, req in dropped:
            if req.time_start is not None or lease.released:
                continue  # it started after all: it ends the normal way
            req._already_revoked = True  # should it still reach the pool: refused
            worker_state.task_ready(req)
            if handed(req.message):  # its channel is not the one that closed
                messages.reject(req, self.c.connection_errors, requeue=True)
            pid = holder_pid(req)
            if pid is None:  # never written to a pool process: it cannot run
                logger.info('mutex: releasing %s: %s[%s] was dropped by the broker '
                            'reconnect and will be redelivered', lease.path, req.name, req.id)
                self.release(lease)
                continue
            # prefork forgot the job, but the process it was written to runs
            # it (and nothing else: fair scheduling writes only to idle
            # processes): stop it now, release once it has exited.
            logger.warning('mutex: %s[%s] was dropped by the broker reconnect but sits in '
                           'pool process %s: killing it before releasing %s',
                           req.name, req.id, pid, lease.path)
            req._mutex_killed = True
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            self.release_after_exit(req, lease, pid)
