"""The consumer gate: a guarded request reaches the pool only with its lease.

The gate replaces the consumer's ``on_task_request`` (what the strategy calls
to hand a request to the pool), so it sees requests from the immediate, ETA
and rate-limited paths, after Celery dropped revoked and expired ones.

For a guarded request it derives the key, asks ZooKeeper for the lease without
waiting, and returns; the answer comes back on kazoo's thread and is handed to
the consumer with ``call_soon``. Then:

* acquired: the lease is stamped into the request (``self.request.mutex_lease``
  in the task) and the request goes to the pool; the lease is released when
  the request ends, on every path (success, failure, Retry, Reject, Ignore,
  revoked, terminated, time limit, worker lost), exactly once;
* contended, or ZooKeeper unavailable: the request is marked ready in the
  worker state and its message is held in the consumer (on the consumer's
  timer) for ``mutex_requeue_delay`` seconds, then rejected back to the broker
  with requeue. It never reaches the pool. While held the prefetch count is
  raised by one (as Celery does for ETA tasks) so other work keeps flowing,
  but only for ``mutex_max_held`` messages: beyond that a held message keeps
  its prefetch slot, so a hot key cannot pull its whole queue into memory;
* the key cannot be built (arguments that do not bind, values that are not
  JSON): the task fails with that error in its result and is not requeued.

A lease is released only once its task can no longer run: when the pool kills
a child (hard time limit, revoke with terminate, worker lost) Celery reports
the end before the child is gone, so the release waits until the child process
has exited.

Everything here runs on the consumer thread, except ``release`` paths called
from the pool's callbacks, which touch only thread-safe lease state.
"""
from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import Any, Dict, Optional

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.bootsteps import RUN
from celery.worker import state as worker_state

from .exceptions import MutexConfigError, MutexKeyError
from .lease import Lease, LeaseOutcome, ZooKeeperLeases
from .options import MutexKey, MutexPolicy, MutexSettings, policy_for_task
from .payload import lease_data
from .processes import process_alive

__all__ = ('MutexGate', 'MutexPolicies')

logger = logging.getLogger(__name__)

# Ends after which the pool child may still be running the task.
_KILLED = (TimeLimitExceeded, WorkerLostError, Terminated)
_DEAD_POLL = 0.02
_UNAVAILABLE_LOG_EVERY = 10.0


class MutexPolicies:
    """Task name -> validated policy, or None for unguarded tasks."""

    def __init__(self, app: Any, settings: MutexSettings) -> None:
        self.app = app
        self.settings = settings
        self._policies: Dict[str, Optional[MutexPolicy]] = {}

    def validate_all(self) -> None:
        """Check every registered task; raises MutexConfigError on a mistake."""
        for name, task in sorted(self.app.tasks.items()):
            self._policies[name] = policy_for_task(task, self.settings)

    def get(self, name: str) -> Optional[MutexPolicy]:
        try:
            return self._policies[name]
        except KeyError:
            policy = policy_for_task(self.app.tasks[name], self.settings)
            self._policies[name] = policy
            return policy

    def guarded(self) -> Dict[str, MutexPolicy]:
        return {n: p for n, p in self._policies.items() if p is not None}


class _Held:
    __slots__ = ('req', 'key', 'entry', 'compensated', 'since')

    def __init__(self, req: Any, key: MutexKey, compensated: bool) -> None:
        self.req = req
        self.key = key
        self.entry = None
        self.compensated = compensated
        self.since = time.monotonic()


class MutexGate:
    """Holds guarded requests to their lease between the consumer and the pool."""

    def __init__(self, consumer: Any, leases: ZooKeeperLeases,
                 policies: MutexPolicies, settings: MutexSettings) -> None:
        self.c = consumer
        self.leases = leases
        self.policies = policies
        self.settings = settings
        self.hostname = getattr(consumer, 'hostname', None)
        self._next = None
        self._held: Dict[Any, _Held] = {}
        self._compensated = 0
        self._generation = 0
        self._granted: Dict[Lease, Any] = {}
        self._last_unavailable_log = 0.0
        self.counters = dict.fromkeys(
            ('acquired', 'contended', 'requeued', 'unavailable', 'refused',
             'released', 'lost'), 0)

    def install(self) -> None:
        """Put the gate in front of the consumer's ``on_task_request``."""
        if self._next is None:
            self._next = self.c.on_task_request
            self.c.on_task_request = self.on_task_request

    # -- arrival -----------------------------------------------------------

    def on_task_request(self, req: Any) -> None:
        try:
            try:
                policy = self.policies.get(req.type)
            except MutexConfigError as exc:
                return self._refuse(req, exc)
            if policy is None:
                return self._next(req)
            try:
                key = policy.key_for(req.args, req.kwargs)
            except MutexKeyError as exc:
                return self._refuse(req, exc)
            self._acquire(req, key)
        except Exception:  # never into the consumer's event loop
            logger.exception('mutex: gate failed on %s[%s]; handing it back',
                             getattr(req, 'name', '?'), getattr(req, 'id', '?'))
            self._reject(req, requeue=True)

    def _acquire(self, req: Any, key: MutexKey) -> None:
        if not self.leases.connected:
            return self._hold(req, key, LeaseOutcome.UNAVAILABLE)
        generation = self._generation
        call_soon = self.c.call_soon

        def answered(outcome: str, lease: Optional[Lease], exc: Optional[BaseException]) -> None:
            # kazoo's thread: hand the answer to the consumer.
            call_soon(self._answered, req, key, generation, outcome, lease, exc)

        data = lease_data(req, key, hostname=self.hostname,
                          store_values=self.settings.store_values)
        self.leases.acquire(key.digest, data, answered, owner=req.id)

    def _answered(self, req: Any, key: MutexKey, generation: int, outcome: str,
                  lease: Optional[Lease], exc: Optional[BaseException]) -> None:
        try:
            if generation != self._generation:
                # The broker connection restarted meanwhile: this message is
                # gone from us (the broker redelivers it), so is its lease.
                if lease is not None:
                    self.leases.release(lease)
                return
            if outcome == LeaseOutcome.ACQUIRED:
                self._grant(req, key, lease)
            else:
                self._hold(req, key, outcome, exc)
        except Exception:
            logger.exception('mutex: could not handle the lease answer for %s[%s]',
                             req.name, req.id)
            if lease is not None:
                self.leases.release(lease)
            self._reject(req, requeue=True)

    # -- acquired ----------------------------------------------------------

    def _grant(self, req: Any, key: MutexKey, lease: Lease) -> None:
        self.counters['acquired'] += 1
        self._granted[lease] = req
        self._bind_release(req, lease)
        req._request_dict['mutex_lease'] = {
            'mutex': key.policy.name, 'key': key.digest, 'path': lease.path,
            'token': lease.token, 'session': lease.session_id,
            'timeout': key.policy.timeout,
        }
        self._next(req)

    def _bind_release(self, req: Any, lease: Lease) -> None:
        """Wrap the request's end callbacks (per instance) to release the lease."""
        release = partial(self._release, lease)
        after_exit = partial(self._release_after_exit, req, lease)
        on_success, on_failure = req.on_success, req.on_failure
        on_timeout = req.on_timeout
        announce_revoked = req._announce_revoked
        announce_cancelled = req._announce_cancelled

        def on_success_(*args: Any, **kwargs: Any) -> Any:
            try:
                return on_success(*args, **kwargs)
            finally:
                failed, retval, _ = args[0]
                if failed and isinstance(_exception(retval), _KILLED):
                    after_exit()
                else:
                    release()

        def on_failure_(exc_info: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return on_failure(exc_info, *args, **kwargs)
            finally:
                if isinstance(_exception(exc_info), _KILLED):
                    after_exit()
                else:
                    release()

        def on_timeout_(soft: bool, timeout: Any) -> Any:
            try:
                return on_timeout(soft, timeout)
            finally:
                if not soft:
                    after_exit()

        def announce_revoked_(reason: Any, terminated: bool, *args: Any) -> Any:
            try:
                return announce_revoked(reason, terminated, *args)
            finally:
                if terminated or req.time_start:
                    after_exit()
                else:  # never started: nothing runs
                    release()

        def announce_cancelled_(*args: Any, **kwargs: Any) -> Any:
            try:
                return announce_cancelled(*args, **kwargs)
            finally:
                after_exit() if req.time_start else release()

        req.on_success = on_success_
        req.on_failure = on_failure_
        req.on_timeout = on_timeout_
        req._announce_revoked = announce_revoked_
        req._announce_cancelled = announce_cancelled_

    def _release(self, lease: Lease) -> None:
        # Any thread (prefork: hub; threads pool: executor; solo: inline).
        if self.leases.release(lease):
            self._granted.pop(lease, None)
            self.counters['released'] += 1

    def _release_after_exit(self, req: Any, lease: Lease) -> None:
        pid = getattr(req, 'worker_pid', None)
        if not pid or pid == os.getpid():
            return self._release(lease)  # solo/threads: the task has returned
        self.c.call_soon(self._wait_exit, lease, pid, time.monotonic())

    def _wait_exit(self, lease: Lease, pid: int, since: float) -> None:
        if lease.released:
            return
        if not process_alive(pid):
            return self._release(lease)
        if time.monotonic() - since > 30:
            logger.warning('mutex: pool process %s still alive 30s after its task '
                           'ended; lease %s stays held until it exits', pid, lease.path)
            since = time.monotonic() + 3600
        self.c.timer.call_after(_DEAD_POLL, self.c.call_soon,
                                (self._wait_exit, lease, pid, since))

    # -- contended or unavailable -----------------------------------------

    def _hold(self, req: Any, key: MutexKey, outcome: str,
              exc: Optional[BaseException] = None) -> None:
        worker_state.task_ready(req)
        if outcome == LeaseOutcome.CONTENDED:
            self.counters['contended'] += 1
            logger.debug('mutex: %s[%s] contended on %s; held %.2fs then requeued',
                         req.name, req.id, key.describe(), key.policy.requeue_delay)
        else:
            self.counters['unavailable'] += 1
            self._log_unavailable(req, exc)
        compensated = self._compensated < self.settings.max_held
        held = _Held(req, key, compensated)
        if compensated:
            self._compensated += 1
            self.c.qos.increment_eventually()
        self._held[req] = held
        held.entry = self.c.timer.call_after(
            key.policy.requeue_delay, self.c.call_soon, (self._hand_back, req))

    def _log_unavailable(self, req: Any, exc: Optional[BaseException]) -> None:
        now = time.monotonic()
        if now - self._last_unavailable_log < _UNAVAILABLE_LOG_EVERY:
            return
        self._last_unavailable_log = now
        since = self.leases.disconnected_since
        for_ = f' for {now - since:.0f}s' if since is not None else ''
        logger.warning(
            'mutex: ZooKeeper (%s) is not reachable%s; guarded tasks are not run '
            'and go back to the broker (e.g. %s[%s])%s', self.leases.hosts, for_,
            req.name, req.id, f': {exc!r}' if exc else '')

    def _hand_back(self, req: Any) -> None:
        held = self._held.pop(req, None)
        if held is None:
            return
        self._uncompensate(held)
        if req.revoked():  # announces it as revoked and acks it
            return
        self.counters['requeued'] += 1
        self._reject(req, requeue=True)

    def _uncompensate(self, held: _Held) -> None:
        if held.compensated:
            self._compensated -= 1
            self.c.qos.decrement_eventually()

    # -- refusing and rejecting --------------------------------------------

    def _refuse(self, req: Any, exc: Exception) -> None:
        """Fail a request whose key cannot be built; do not requeue it."""
        self.counters['refused'] += 1
        logger.error('mutex: %s[%s] refused: %s', req.name, req.id, exc)
        worker_state.task_ready(req)
        try:
            req.task.backend.mark_as_failure(
                req.id, exc, request=req._context, store_result=req.store_errors)
        except Exception:
            logger.exception('mutex: could not store the failure of %s', req.id)
        req.send_event('task-failed', exception=repr(exc), traceback='')
        self._reject(req, requeue=False)

    def _reject(self, req: Any, requeue: bool) -> None:
        # Straight on the message: Request.reject goes through call_soon,
        # which waits for the next poll of the hub.
        if req.acknowledged:
            return
        req.acknowledged = True
        req.message.reject_log_error(logger, self.c.connection_errors, requeue=requeue)

    # -- consumer lifecycle ------------------------------------------------

    def stop(self) -> None:
        """The consumer stops: on shutdown hand held messages back now.

        On a broker reconnect their channel is gone and the broker requeues
        them itself; answers still on their way are ignored.
        """
        reconnect = self.c.blueprint.state == RUN
        self._generation += 1
        held, self._held = self._held, {}
        self._compensated = 0
        for h in held.values():
            if h.entry is not None:
                try:
                    self.c.timer.cancel(h.entry)
                except Exception:
                    pass
            if not reconnect:
                self.counters['requeued'] += 1
                try:
                    self._reject(h.req, requeue=True)
                except Exception as exc:
                    logger.warning('mutex: could not hand back %s: %r', h.req.id, exc)

    def info(self) -> Dict[str, Any]:
        return {
            'session': 'connected' if self.leases.connected else 'disconnected',
            'session_id': self.leases.session_id,
            'held_messages': len(self._held),
            'leases': [
                {'key': lease.key, 'token': lease.token, 'task_id': lease.owner,
                 'age': round(time.monotonic() - lease.acquired_monotonic, 3)}
                for lease in self.leases.held()
            ],
            'counters': dict(self.counters),
        }


def _exception(exc_info: Any) -> Any:
    exc = getattr(exc_info, 'exception', exc_info)
    return getattr(exc, 'exc', exc)  # ExceptionWithTraceback
