"""The consumer gate: a guarded request reaches the pool only with its lease.

The gate replaces the consumer's ``on_task_request`` (what the strategy calls
to hand a request to the pool), so it sees requests from the immediate, ETA
and rate-limited paths, after Celery dropped revoked and expired ones.

For a guarded request it derives the key, asks ZooKeeper for the lease without
waiting, and returns; the answer comes back on kazoo's thread and is handed to
the consumer with ``call_soon``. Then:

* acquired: the lease is stamped into the request (``self.request.mutex_lease``
  in the task) and the request goes to the pool. The lease is released when
  the request ends, on every path, exactly once; when the pool kills the task
  (time limit, terminate, worker lost) only after its process has exited. A
  holder that outlives ``mutex_timeout`` is killed with SIGKILL first.
* contended (``mutex_contended='requeue'``): the request is marked ready in the
  worker state and its message waits in the consumer (:mod:`.waiting`), never
  in the pool. A ZooKeeper watch on the holder's node wakes the first waiter
  of the key the moment it is freed; it tries again and runs if it wins.
  After ``mutex_requeue_delay`` a waiter goes back to the broker (or, after
  ``mutex_republish_after`` deliveries on a quorum queue, is republished).
  A waiter that is revoked is dropped as revoked at once.
* contended (``'skip'``): the task fails with :class:`MutexContended` in its
  result, a WARNING and a ``task-mutex-skipped`` event; the message is acked.
* ZooKeeper unavailable: the message waits the same way and goes back to the
  broker; it never runs without a lease and is never dropped.
* the key cannot be built: the task fails with that error in its result and
  the message is not requeued.

Everything here runs on the consumer thread, except the release paths, which
the pool calls on its own threads and which touch only thread-safe state.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Dict, Optional

from celery.worker import state as worker_state

from .exceptions import MutexConfigError, MutexContended, MutexKeyError, MutexTimeout
from .lease import Lease, LeaseOutcome, ZooKeeperLeases
from .metrics import MutexMetrics
from .options import MutexKey, MutexPolicy, MutexSettings, policy_for_task
from .payload import lease_data
from .processes import process_alive
from .request_end import watch_request_end
from .waiting import Held, WaitingRoom

__all__ = ('MutexGate', 'MutexPolicies')

logger = logging.getLogger(__name__)

_EXIT_POLL = 0.02
_REVOKE_POLL = 0.1
_SWEEP_EVERY = 0.25
_DROPPED_GRACE = 2.0
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


class MutexGate:
    """Holds guarded requests to their lease between the consumer and the pool."""

    def __init__(self, consumer: Any, leases: ZooKeeperLeases,
                 policies: MutexPolicies, settings: MutexSettings) -> None:
        self.c = consumer
        self.leases = leases
        self.policies = policies
        self.settings = settings
        self.hostname = getattr(consumer, 'hostname', None)
        self._next: Any = None
        self.room = WaitingRoom(consumer, settings.max_held, self._expired)
        self._generation = 0
        self._watching: set = set()
        self._revoke_timer: Any = None
        self._granted: Dict[Lease, Any] = {}   # lease -> request
        self._policy_of: Dict[Lease, MutexPolicy] = {}
        self._sweep_timer: Any = None
        self._last_unavailable_log = 0.0
        self._inbox: deque = deque()
        self._arrivals = 0
        self._drain_scheduled = False
        self.metrics = MutexMetrics()

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
            self._arrivals += 1
            seq = self._arrivals
            if not self.leases.connected:
                return self._wait(req, key, LeaseOutcome.UNAVAILABLE, seq=seq)
            if policy.contended == 'requeue' and self.room.has_waiters(key.digest):
                # Queue behind this worker's waiters for the key: arrival order.
                return self._wait(req, key, LeaseOutcome.CONTENDED, seq=seq)
            self._try(req, key, None, seq)
        except Exception:  # never into the consumer's event loop
            logger.exception('mutex: gate failed on %s[%s]; handing it back',
                             getattr(req, 'name', '?'), getattr(req, 'id', '?'))
            self._reject(req, requeue=True)

    def _post(self, *call: Any) -> None:
        """From any thread: run ``call`` on the consumer thread, in order.

        The hub's ``call_soon`` keeps a set, so its callbacks run in no
        particular order; answers go through this FIFO instead, which keeps
        a key's waiters in arrival order and wakes the hub once per batch.
        """
        self._inbox.append(call)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.c.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        inbox = self._inbox
        while inbox:
            fun, *args = inbox.popleft()
            try:
                fun(*args)
            except Exception:
                logger.exception('mutex: %r failed', fun)

    def _try(self, req: Any, key: MutexKey, held: Optional[Held], seq: int = 0) -> None:
        generation = self._generation
        post = self._post

        def answered(outcome: str, lease: Optional[Lease], exc: Optional[BaseException]) -> None:
            # kazoo's thread: hand the answer to the consumer.
            post(self._answered, req, key, held, generation, outcome, lease, exc, seq)

        if held is not None:
            held.trying = True
        data = lease_data(req, key, hostname=self.hostname,
                          store_values=self.settings.store_values)
        self.leases.acquire(key.slots, data, answered, owner=req.id)

    def _answered(self, req: Any, key: MutexKey, held: Optional[Held], generation: int,
                  outcome: str, lease: Optional[Lease], exc: Optional[BaseException],
                  seq: int = 0) -> None:
        try:
            if held is not None:
                held.trying = False
            if lease is not None and outcome != LeaseOutcome.ACQUIRED:
                self.leases.release(lease)  # won under a session given up since
                lease = None
            if generation != self._generation or (held is not None and held.gone):
                # The message left us meanwhile (broker reconnect, handed
                # back, revoked): so does any lease won for it.
                if lease is not None:
                    self.leases.release(lease)
                return
            if outcome == LeaseOutcome.ACQUIRED:
                if held is not None:
                    self.room.leave(held)
                    worker_state.task_reserved(req)
                self._grant(req, key, lease)
                if self.room.has_waiters(key.digest):
                    self._watch(key)
            elif held is not None:
                if outcome == LeaseOutcome.CONTENDED:
                    self._watch(key)
            elif outcome == LeaseOutcome.CONTENDED and key.policy.contended == 'skip':
                self._skip(req, key)
            else:
                self._wait(req, key, outcome, exc, seq=seq)
        except Exception:
            logger.exception('mutex: could not handle the lease answer for %s[%s]',
                             req.name, req.id)
            if lease is not None:
                self.leases.release(lease)
            if held is not None:
                self.room.leave(held)
            self._reject(req, requeue=True)

    # -- acquired ----------------------------------------------------------

    def _grant(self, req: Any, key: MutexKey, lease: Lease) -> None:
        self.metrics.inc('acquired')
        logger.debug('mutex: %s[%s] acquired %s (token %s)', req.name, req.id,
                     key.describe(), lease.token)
        req._request_dict['mutex_lease'] = {
            'mutex': key.policy.name, 'key': lease.key, 'path': lease.path,
            'token': lease.token, 'session': lease.session_id,
            'timeout': key.policy.timeout,
        }
        self._granted[lease] = req
        self._policy_of[lease] = key.policy
        watch_request_end(
            req,
            ended=lambda: self._release(lease),
            killed=lambda: self._release_after_exit(req, lease),
            started=lambda: self._started(req, lease),
        )
        if self._sweep_timer is None:
            self._sweep_overruns()
        self._next(req)

    def _started(self, req: Any, lease: Lease) -> None:
        # The pool's thread. A lease lost before the pool started the task
        # (the session ended while it sat in the pool's queue): stop it now.
        if lease.lost:
            self._post(self._stop_holder, req, lease, 'its lease was lost before it started')

    def _release(self, lease: Lease) -> None:
        # Any thread (prefork: the hub; threads pool: an executor; solo: inline).
        self._granted.pop(lease, None)
        self._policy_of.pop(lease, None)
        if self.leases.release(lease):
            self.metrics.inc('released')
            self.metrics.held_for(time.monotonic() - lease.acquired_monotonic)

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
            logger.warning('mutex: pool process %s is still alive 30s after its task '
                           'was killed; lease %s stays held until it exits', pid, lease.path)
            since = float('inf')
        self.c.timer.call_after(_EXIT_POLL, self.c.call_soon,
                                (self._wait_exit, lease, pid, since))

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
            self._store_failure(req, MutexTimeout(req.name, policy.timeout))
        else:  # acks_late: the message goes back to the broker
            self._reject(req, requeue=True)
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
        self._release_after_exit(req, lease)

    # -- contended or unavailable -----------------------------------------

    def _wait(self, req: Any, key: MutexKey, outcome: str,
              exc: Optional[BaseException] = None, seq: int = 0) -> None:
        worker_state.task_ready(req)
        if outcome == LeaseOutcome.CONTENDED:
            self.metrics.inc('contended')
            req.send_event('task-mutex-contended', key=key.digest, mutex=key.describe())
            logger.debug('mutex: %s[%s] contended on %s', req.name, req.id, key.describe())
        else:
            self.metrics.inc('unavailable')
            self._log_unavailable(req, exc)
        self.room.hold(req, key, key.policy.requeue_delay, seq)
        if outcome == LeaseOutcome.CONTENDED:
            self._watch(key)
        self._poll_revoked()

    def _watch(self, key: MutexKey) -> None:
        digest = key.digest
        if digest in self._watching or not self.leases.connected:
            return
        self._watching.add(digest)
        generation = self._generation
        post = self._post
        self.leases.watch(key.slots, lambda: post(self._wake, digest, generation))

    def _wake(self, digest: str, generation: int) -> None:
        """A lease of ``digest`` may be free: its first waiter tries again."""
        self._watching.discard(digest)
        if generation != self._generation:
            return
        held = self.room.first(digest)
        if held is not None and not held.trying:
            logger.debug('mutex: %s freed? %s[%s] tries again', digest[:12],
                         held.req.name, held.req.id)
            self._try(held.req, held.key, held)

    def _expired(self, held: Held) -> None:
        """A waiter's delay is over: hand its message back to the broker."""
        self.room.leave(held)
        req = held.req
        if req.revoked():  # announced as revoked and acked
            return
        count = (req.message.headers or {}).get('x-delivery-count')
        limit = held.key.policy.republish_after
        if limit and isinstance(count, int) and count >= limit:
            if self._republish(req):
                return
        self.metrics.inc('requeued')
        req.send_event('task-mutex-requeued', key=held.key.digest)
        self._reject(req, requeue=True)

    def _republish(self, req: Any) -> bool:
        """Publish a fresh copy (delivery count 0), then ack the original."""
        message = req.message
        info = message.delivery_info or {}
        headers = {k: v for k, v in (message.headers or {}).items()
                   if k != 'x-delivery-count'}
        props = message.properties or {}
        try:
            with self.c.app.producer_or_acquire() as producer:
                producer.publish(
                    message.body, exchange=info.get('exchange') or '',
                    routing_key=info.get('routing_key'), headers=headers,
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    correlation_id=props.get('correlation_id'),
                    reply_to=props.get('reply_to'), priority=props.get('priority'),
                    delivery_mode=props.get('delivery_mode'), retry=False)
        except Exception as exc:
            logger.warning('mutex: could not republish %s[%s]: %r; requeueing it',
                           req.name, req.id, exc)
            return False
        self.metrics.inc('republished')
        if not req.acknowledged:
            req.acknowledged = True
            message.ack_log_error(logger, self.c.connection_errors)
        return True

    def _poll_revoked(self) -> None:
        """While messages wait, drop revoked ones at once (as revoked)."""
        if self._revoke_timer is not None or not len(self.room):
            return

        def check() -> None:
            self._revoke_timer = None
            for held in list(self.room):
                if held.req.id in worker_state.revoked or held.req.expires:
                    if held.req.revoked():
                        self.room.leave(held)
            self._poll_revoked()
        self._revoke_timer = self.c.timer.call_after(
            _REVOKE_POLL, self.c.call_soon, (check,))

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

    # -- skipping, refusing and rejecting -----------------------------------

    def _skip(self, req: Any, key: MutexKey) -> None:
        """``mutex_contended='skip'``: drop visibly, never silently."""
        self.metrics.inc('skipped')
        worker_state.task_ready(req)
        exc = MutexContended(req.name, key.describe())
        logger.warning('mutex: %s[%s] skipped: %s is held (mutex_contended=skip)',
                       req.name, req.id, key.describe())
        self._store_failure(req, exc)
        req.send_event('task-mutex-skipped', key=key.digest, mutex=key.describe())
        req.acknowledged = True
        req.message.ack_log_error(logger, self.c.connection_errors)

    def _refuse(self, req: Any, exc: Exception) -> None:
        """Fail a request whose key cannot be built; do not requeue it."""
        self.metrics.inc('refused')
        logger.error('mutex: %s[%s] refused: %s', req.name, req.id, exc)
        worker_state.task_ready(req)
        self._store_failure(req, exc)
        req.send_event('task-failed', exception=repr(exc), traceback='')
        self._reject(req, requeue=False)

    def _store_failure(self, req: Any, exc: Exception) -> None:
        try:
            req.task.backend.mark_as_failure(
                req.id, exc, request=req._context, store_result=req.store_errors)
        except Exception:
            logger.exception('mutex: could not store the failure of %s', req.id)

    def _reject(self, req: Any, requeue: bool) -> None:
        # Straight on the message: Request.reject goes through call_soon,
        # which waits for the next poll of the hub.
        if req.acknowledged:
            return
        req.acknowledged = True
        req.message.reject_log_error(logger, self.c.connection_errors, requeue=requeue)

    # -- consumer and session lifecycle --------------------------------------

    def on_lost(self, leases: list) -> None:
        """The session's leases are gone (any thread): stop their holders."""
        self._post(self._session_lost, leases)

    def _session_lost(self, leases: list) -> None:
        for lease in leases:
            self._policy_of.pop(lease, None)
            req = self._granted.pop(lease, None)
            if req is None or lease.released:
                continue
            self.metrics.inc('lost')
            req.send_event('task-mutex-lost', key=lease.key)
            if req.time_start is None:
                self._stop_holder(req, lease, 'its lease was lost before it started')
            elif self.settings.on_session_loss == 'continue':
                logger.error('mutex: %s[%s] lost its lease with the ZooKeeper session; it '
                             'continues WITHOUT exclusivity (mutex_on_session_loss=continue)',
                             req.name, req.id)
            else:
                self._stop_holder(req, lease, 'its lease was lost with the ZooKeeper session')

    def _stop_holder(self, req: Any, lease: Lease, why: str) -> None:
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
            if not req.acknowledged:
                self._reject(req, requeue=True)
            elif not self._republish(req):
                logger.error('mutex: %s[%s] could not be republished: it will not run again',
                             req.name, req.id)
        if not started:
            # Still in the pool's queue: execute_using_pool will refuse it.
            req._already_revoked = True
            worker_state.task_ready(req)
            self._release(lease)
        elif killable:
            self._kill(req, lease)

    def start(self) -> None:
        """The consumer (re)started: resume watching running holders."""
        if self._granted and self._sweep_timer is None:
            self._sweep_overruns()

    def _release_dropped(self, dropped: list) -> None:
        for lease, req in dropped:
            if req.time_start is None and not lease.released:
                logger.info('mutex: releasing %s: %s[%s] was dropped by the broker '
                            'reconnect and will be redelivered', lease.path, req.name, req.id)
                req._already_revoked = True  # should it still reach the pool: refused
                worker_state.task_ready(req)
                self._release(lease)

    def on_session(self, state: str) -> None:
        """The ZooKeeper session changed state (consumer thread)."""
        if state != 'connected':
            self._watching.clear()  # kazoo re-arms watches only within a session
            return
        for digest in list({h.key.digest for h in self.room}):
            self._wake(digest, self._generation)

    def stop(self) -> None:
        """The consumer stops: on shutdown hand waiting messages back now.

        On a broker reconnect their channel is gone and the broker requeues
        them itself; answers still on their way are ignored.
        """
        from celery.bootsteps import RUN
        reconnect = self.c.blueprint.state == RUN
        self._generation += 1
        for timer in (self._sweep_timer, self._revoke_timer):
            if timer is not None:
                timer.cancel()
        self._sweep_timer = self._revoke_timer = None
        if reconnect and _pool_drops_queued(self.c.pool):
            # prefork drops requests it had not started yet, without a word:
            # their messages come back from the broker, their leases must go.
            dropped = [(lease, req) for lease, req in list(self._granted.items())
                       if req.time_start is None]
            if dropped:
                self.c.timer.call_after(_DROPPED_GRACE, self.c.call_soon,
                                        (self._release_dropped, dropped))
        self._watching.clear()
        for held in self.room.clear(restore_qos=False):
            if not reconnect:
                self.metrics.inc('requeued')
                try:
                    self._reject(held.req, requeue=True)
                except Exception as exc:
                    logger.warning('mutex: could not hand back %s: %r', held.req.id, exc)

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

    def info(self) -> Dict[str, Any]:
        return {
            'session': 'connected' if self.leases.connected else 'disconnected',
            'session_id': self.leases.session_id,
            'waiting': [{'task_id': h.req.id, 'task': h.req.name, 'key': h.key.digest,
                         'waited': round(time.monotonic() - h.since, 3)} for h in self.room],
            'leases': [
                {'key': lease.key, 'path': lease.path, 'token': lease.token,
                 'session_id': lease.session_id, 'task_id': lease.owner,
                 'task': getattr(self._granted.get(lease), 'name', None),
                 'age': round(time.monotonic() - lease.acquired_monotonic, 3)}
                for lease in self.leases.held()
            ],
            **self.metrics.snapshot(),
            'zookeeper_ops': dict(self.leases.stats),
        }


def _pool_drops_queued(pool: Any) -> bool:
    """prefork flushes requests it has not started on a broker reconnect."""
    return type(pool).__module__.endswith('.prefork')
