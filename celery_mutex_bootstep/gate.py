"""The consumer gate: a guarded request reaches the pool only with its lease.

The gate replaces the consumer's ``on_task_request`` (what the strategy calls
to hand a request to the pool), so it sees requests from the immediate, ETA
and rate-limited paths, after Celery dropped revoked and expired ones.

For a guarded request it derives the key, asks ZooKeeper for the lease without
waiting, and returns; the answer comes back on kazoo's thread and is handed to
the consumer with ``call_soon``. Then:

* acquired: the lease is stamped into the request (``self.request.mutex_lease``
  in the task) and the request goes to the pool; :mod:`.holders` releases the
  lease when the request ends, on every path, exactly once, and only once its
  task can no longer run.
* contended (``mutex_contended='requeue'``): its message waits in the consumer
  (:mod:`.waiting`), a few per key, woken by a watch on the holder's node the
  moment it is freed, or is parked on the broker (:mod:`.parked`); never in the
  pool. A revoked waiter is dropped as revoked; one past its
  ``mutex_wait_timeout`` fails (:mod:`.deadlines`).
* contended (``'skip'``): FAILURE with :class:`MutexContended`, visibly (:mod:`.endings`).
* ZooKeeper unavailable: the message waits the same way and goes back to the
  broker; it never runs without a lease and is never dropped.
* the key cannot be built: FAILURE with that error; the message is not requeued.

Everything here runs on the consumer thread; kazoo's answers reach it through
one FIFO that wakes the event loop (:mod:`.inbox`). The one exception is the
reaction to a lost session, which kills the holders on the thread that
noticed (:mod:`.stopping`) before anything here runs.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Dict, Optional

from celery.worker import state as worker_state

from . import messages
from .capacity import PoolPlaces
from .deadlines import Deadlines
from .endings import Endings
from .gate_info import gate_info
from .gate_lifecycle import GateLifecycle
from .handoff import handed
from .exceptions import MutexConfigError, MutexKeyError
from .holders import Holders
from .inbox import Inbox
from .lease import Lease, LeaseOutcome, ZooKeeperLeases
from .metrics import MutexMetrics
from .options import MutexKey, MutexSettings
from .parked import ParkedKeys
from .parking import ParkingLot
from .payload import lease_data
from .policies import MutexPolicies
from .replacing import Replacing
from .supersede import ONE_WAITING, Coalescing
from .verdicts import Verdicts
from .waiting import Held, WaitingRoom

__all__ = ('MutexGate', 'MutexPolicies')  # MutexPolicies re-exported from .policies

logger = logging.getLogger(__name__)

# A room waiter parks itself after this long unacknowledged (RabbitMQ's consumer
# timeout, 30 min by default, would close the channel).
_ROOM_WAIT_MAX = 600.0


class MutexGate(GateLifecycle):
    """Holds guarded requests to their lease between the consumer and the pool."""

    def __init__(self, consumer: Any, leases: ZooKeeperLeases,
                 policies: MutexPolicies, settings: MutexSettings, inbox: Inbox) -> None:
        self.c = consumer
        self.inbox = inbox
        self.leases = leases
        self.policies = policies
        self.settings = settings
        self.hostname = getattr(consumer, 'hostname', None)
        self._next: Any = None
        self.room = WaitingRoom(consumer, settings.max_held, self._expired, inbox.later)
        self._generation = 0
        self._watching: set = set()
        self._in_flight: Counter = Counter()  # digest -> first tries not answered yet
        self._arrivals = 0
        self._post = inbox.post
        self.metrics = MutexMetrics()
        self.endings = Endings(consumer, leases, self.metrics)
        self.verdicts = Verdicts(consumer, inbox.post)  # results stored off this thread
        self.deadlines = Deadlines(self.metrics, self.verdicts)
        self.coalesce = Coalescing(self.room, self.verdicts, self.metrics)
        self.holders = Holders(consumer, leases, self.metrics, settings, inbox)
        self.replacing = Replacing(consumer, leases, self.holders, self.verdicts, inbox.post,
                                   self.metrics)
        self.places = PoolPlaces(consumer, inbox.post, self._pump, settings.lease_ahead)
        self.parked: Optional[ParkedKeys] = None
        if settings.park:
            self.parked = ParkedKeys(
                consumer, ParkingLot(consumer.app, leases, self._post), self.room,
                self.metrics, settings.max_held, inbox.later)
            self.parked.here = self._here

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
                return self.endings.refuse(req, exc)
            if policy is None:
                self.places.entered(req)
                return self._next(req)
            try:
                key = policy.key_for(req.args, req.kwargs)
            except MutexKeyError as exc:
                return self.endings.refuse(req, exc)
            self._arrivals += 1
            if self.parked is not None and policy.contended == 'requeue':
                self.parked.arrived(req, key)
            if self.places.line or not self.places.free():
                return self.places.wait(req, key, self._arrivals)  # no hoarding
            self._admit(req, key, self._arrivals)
        except Exception:  # never into the consumer's event loop
            self._failed(req)

    def _failed(self, req: Any) -> None:
        logger.exception('mutex: gate failed on %s[%s]; handing it back',
                         getattr(req, 'name', '?'), getattr(req, 'id', '?'))
        self.endings.reject(req, requeue=True)

    def _admit(self, req: Any, key: MutexKey, seq: int) -> None:
        """A pool place is free for ``req``: try its lease, or wait."""
        if self.deadlines.overdue(req, key):  # back from its park queue too late
            return self._expire(req, key)
        if not self.leases.connected:
            return self._wait(req, key, LeaseOutcome.UNAVAILABLE, seq=seq)
        if key.policy.contended in ('requeue', 'coalesce', 'replace') and (
                self.room.has_waiters(key.digest)
                or key.asking_ahead(self._in_flight) >= key.policy.limit
                or (self.parked is not None and self.parked.queue_behind(req, key))):
            # Queue behind the key's waiters (here, asking, and parked): arrival
            # order, whatever order ZooKeeper's answers come back in.
            return self._wait(req, key, LeaseOutcome.CONTENDED, seq=seq)
        self._try(req, key, None, seq)

    def _here(self, digest: str) -> int:
        """This worker's messages of ``digest`` outside its line (for refills)."""
        return (self.room.count(digest) + self._in_flight[digest]
                + sum(1 for _, key, _ in self.places.line if key.digest == digest))

    def _pump(self) -> None:
        """Places freed: woken waiters first (each heads its key's line), then
        requests in arrival order."""
        places = self.places
        while places.pending() and places.free():
            digest = places.next_woken()
            if digest is not None:
                held = self.room.first(digest)
                if held is not None and not held.trying:
                    self._try(held.req, held.key, held)
                continue
            req, key, seq = places.line.popleft()
            try:
                if not req.revoked():  # else announced as revoked and acked
                    self._admit(req, key, seq)
            except Exception:
                self._failed(req)

    def _try(self, req: Any, key: MutexKey, held: Optional[Held], seq: int = 0) -> None:
        generation = self._generation
        post = self._post

        def answered(outcome: str, lease: Optional[Lease], exc: Optional[BaseException]) -> None:
            # kazoo's thread: hand the answer to the consumer.
            post(self._answered, req, key, held, generation, outcome, lease, exc, seq)

        if held is not None:
            held.trying = True
        else:
            self._in_flight.update(key.in_flight)
        self.places.trying(req)
        data = lease_data(req, key, hostname=self.hostname,
                          store_values=self.settings.store_values)
        self.leases.acquire(key.slots, data, answered, owner=req.id, shared=key.policy.shared)

    def _answered(self, req: Any, key: MutexKey, held: Optional[Held], generation: int,
                  outcome: str, lease: Optional[Lease], exc: Optional[BaseException],
                  seq: int = 0) -> None:
        try:
            self.places.tried(req)
            if held is not None:
                held.trying = False
            elif generation == self._generation:
                self._in_flight.subtract(key.in_flight)
                for name in key.in_flight:
                    if self._in_flight[name] <= 0:
                        del self._in_flight[name]
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
                if self.room.has_waiters(key.digest):  # a reader: the next may join it now
                    self._wake(key.digest, generation) if key.policy.shared else self._watch(key)
                if self.parked is not None:
                    self.parked.refill(key.digest)
            elif held is not None:
                if outcome == LeaseOutcome.CONTENDED:
                    self._watch(key)
                    if key.policy.contended == 'replace':  # a new holder, older than it?
                        self.replacing.contended(req, key)
            elif outcome == LeaseOutcome.CONTENDED and key.policy.contended == 'skip':
                self.endings.skip(req, key)
            else:
                self._wait(req, key, outcome, exc, seq=seq, tried=True)
        except Exception:
            logger.exception('mutex: could not handle the lease answer for %s[%s]',
                             req.name, req.id)
            if lease is not None:
                self.holders.release(lease)
            if held is not None:
                self.room.leave(held)
            self.endings.reject(req, requeue=True)
        finally:
            self._pump()

    # -- acquired ----------------------------------------------------------

    def _grant(self, req: Any, key: MutexKey, lease: Lease) -> None:
        self.metrics.inc('acquired')
        if not key.policy.shared and key.policy.name in self.policies.shared_names:
            self.leases.shared.writer_done(key.digest)  # new readers may join again
        if logger.isEnabledFor(logging.DEBUG):  # describe() formats the values
            logger.debug('mutex: %s[%s] acquired %s (token %s)', req.name, req.id,
                         key.describe(), lease.token)
        req._request_dict['mutex_lease'] = {
            'mutex': key.policy.name, 'key': lease.key, 'path': lease.path,
            'token': lease.token, 'session': lease.session_id,
            'timeout': key.policy.timeout,
        }
        self.holders.add(req, lease, key.policy, on_end=self.places.entered(req, watch=False))
        self._next(req)

    # -- contended or unavailable -----------------------------------------

    def _wait(self, req: Any, key: MutexKey, outcome: str,
              exc: Optional[BaseException] = None, seq: int = 0, tried: bool = False) -> None:
        self.endings.waits(req, key, outcome == LeaseOutcome.CONTENDED, exc)
        if key.policy.contended in ONE_WAITING and not self.coalesce.make_room(req, key, seq):
            return  # superseded by the key's newer waiter
        if (outcome == LeaseOutcome.CONTENDED and self.parked is not None
                and key.policy.contended == 'requeue' and self.parked.should_park(
                    req, key, self._in_flight[key.digest], tried)):
            self._park(req, key)
            return
        self.room.hold(req, key, self.deadlines.delay(req, key, key.policy.requeue_delay), seq,
                       compensate=not handed(req.message))
        if outcome == LeaseOutcome.CONTENDED:
            self._watch(key)
            if key.policy.contended == 'replace':
                self.replacing.contended(req, key)
        self.room.poll_revoked()

    def _watch(self, key: MutexKey) -> None:
        digest, shared, first = key.digest, key.policy.shared, self.room.first(key.digest)
        if (not shared and key.policy.name in self.policies.shared_names
                and (first is None or not first.key.policy.shared)):
            self.leases.shared.writer_waits(digest)  # heads its line: no new readers now
        if digest in self._watching or not self.leases.connected:
            return
        self._watching.add(digest)
        generation, post = self._generation, self._post
        self.leases.watch(key.slots, lambda: post(self._wake, digest, generation), shared)

    def _wake(self, digest: str, generation: int) -> None:
        """A lease of ``digest`` may be free: its first waiter tries again."""
        self._watching.discard(digest)
        if generation != self._generation:
            return
        held = self.room.first(digest)
        if self.policies.shared_names and (held is None or held.key.policy.shared):
            self.leases.shared.writer_done(digest)  # no exclusive call heads its line
        if held is not None and not held.trying:
            if not self.places.free():
                self.places.woken(digest)  # it tries when a place frees
            else:
                logger.debug('mutex: %s freed? %s[%s] tries again', digest[:12],
                             held.req.name, held.req.id)
                self._try(held.req, held.key, held)
        if self.parked is not None:
            self.parked.refill(digest)

    def _expired(self, held: Held) -> None:
        """A waiter's delay is over: with parking (or coalescing) it stays, the
        head of its key's line, until it was unacknowledged too long, then parks
        (a coalesced one goes back to its queue); without, back to the broker."""
        req = held.req
        if self.deadlines.overdue(req, held.key) and not req.revoked():
            self.room.leave(held)
            return self._expire(req, held.key)
        contended = held.key.policy.contended
        parking = self.parked is not None and self.leases.connected and contended == 'requeue'
        stays = parking or (contended in ONE_WAITING and self.leases.connected)
        if stays and not req.revoked() and time.monotonic() - held.since < _ROOM_WAIT_MAX:
            self.room.rearm(held, self.deadlines.delay(req, held.key, held.key.policy.requeue_delay))
            # Someone must wake it: a waiter that joined while ZooKeeper was away
            # has no watch yet (on a free key the watch calls back at once).
            self._watch(held.key)
            return
        self.room.leave(held)
        if req.revoked():  # announced as revoked and acked
            return
        if parking:  # RabbitMQ's consumer timeout would close the channel
            self._park(req, held.key)
            return
        if stays:  # coalesced: a fresh copy that stays the older on its return
            self.coalesce.stamp(req)
            return self.holders.republish(req)
        if messages.delivery_limit_reached(req, held.key.policy.republish_after):
            self.holders.republish(req)  # on its own thread; acked once out
            return
        self.metrics.inc('requeued')
        req.send_event('mutex-requeued', key=held.key.digest, mutex=held.key.describe())
        self.endings.reject(req, requeue=True)

    def _expire(self, req: Any, key: MutexKey) -> None:
        self.deadlines.expire(req, key)
        if self.parked is not None:  # the next of its line: overdue too, or it waits here
            self.parked.refill(key.digest)

    def _park(self, req: Any, key: MutexKey) -> None:
        req.send_event('mutex-parked', key=key.digest, mutex=key.describe())
        self.parked.park(req, key)
        self._watch(key)

    def release_matching(self, **match: Any) -> list:
        return self.holders.release_matching(**match)

    def info(self) -> Dict[str, Any]:
        return gate_info(self)
