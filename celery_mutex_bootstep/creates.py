"""Acquiring leases: their creates, gathered per turn of the caller's loop.

Acquisitions asked for in one turn of the consumer's loop go out at the end
of the turn; while a batch is in flight, new ones accumulate and go out when
it returns (as releases do, :mod:`.deletes`): a lone acquisition is sent at
once, a busy worker sends few large batches. A batch is one ``multi`` of
ephemeral creates that ends with a ``setData`` on the session's clock node;
every op of a multi shares one zxid, so the clock's new mzxid is the creation
zxid (the fencing token) of every node of the batch. A multi is atomic: if one
key is held nothing is created, and the batch is asked for again key by key.
A semaphore's slots are tried one after the other. A request asked for under
a session given up since is not sent on the next one.

Releases asked for in the same turn (a holder ended on the consumer thread,
:meth:`CreateBatcher.add_delete`) lead the batch: its multi deletes them, then
creates, so a task's end and the next task's start cost ZooKeeper one write
and the worker one round trip, not two. A release never waits for a batch in
flight (it goes out alone then, :mod:`.deletes`), and :meth:`flush_deletes`
sends what a stopping consumer's loop would no longer run.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional

from kazoo.exceptions import ConnectionLoss, NodeExistsError

from .outcome import LeaseOutcome

__all__ = ('CreateBatcher', 'MAX_BATCH')

Callback = Callable[[str, Any, Optional[BaseException]], None]

MAX_BATCH = 100
# kazoo answers every request (ConnectionLoss at worst); past this a batch in
# flight is taken as lost, so acquisitions can never stall behind it.
_IN_FLIGHT_MAX = 5.0


class CreateBatcher:
    """The creates of one :class:`~.lease.ZooKeeperLeases`."""

    def __init__(self, leases: Any, schedule: Optional[Callable[[Callable[[], None]], Any]]
                 ) -> None:
        self.leases = leases
        # ``schedule(fn)`` runs fn once the caller's turn is over.
        self._schedule = schedule
        self._to_create: List[tuple] = []
        self._to_delete: List[Any] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._in_flight_since: Optional[float] = None

    def add(self, item: tuple) -> bool:
        """Gather ``(keys, data, callback, owner, session id)`` for the next
        batch; False when it must go out alone (no scheduler, no clock yet)."""
        clock = self.leases._clock
        if self._schedule is None or clock is None or clock[1] != item[4]:
            return False
        with self._lock:
            self._to_create.append(item)
            since = self._in_flight_since
            if since is not None and time.monotonic() - since < _IN_FLIGHT_MAX:
                return True  # goes out when the batch in flight returns
            if self._scheduled:
                return True
            self._scheduled = True
        self._schedule(self._send)
        return True

    def add_delete(self, lease: Any) -> bool:
        """Release ``lease`` with this turn's batch; False when it must go out
        alone now (no scheduler, or a batch in flight it would wait behind)."""
        if self._schedule is None:
            return False
        with self._lock:
            if self._in_flight_since is not None:
                return False
            self._to_delete.append(lease)
            if self._scheduled:
                return True
            self._scheduled = True
        self._schedule(self._send)
        return True

    def flush_deletes(self) -> None:
        """Send the releases waiting for this turn's batch now (the consumer
        stops: its loop may not run the scheduled send for a while)."""
        with self._lock:
            deletes, self._to_delete = self._to_delete, []
        if deletes:
            self.leases.deletes.queue_many(deletes)

    def _landed(self) -> None:
        """The batch in flight answered (kazoo's thread): send what waited."""
        with self._lock:
            self._in_flight_since = None
            if not self._to_create or self._scheduled:
                return
        self._send()

    def _send(self) -> None:
        """Send the gathered acquisitions (caller's thread, or kazoo's when a
        batch returned)."""
        with self._lock:
            self._scheduled = False
            batch = self._to_create[:MAX_BATCH]
            self._to_create = self._to_create[MAX_BATCH:]
            deletes, self._to_delete = self._to_delete, []
            if not batch:
                if deletes:
                    self.leases.deletes.queue_many(deletes)
                return
            self._in_flight_since = time.monotonic()
            more = bool(self._to_create)
        if more:
            with self._lock:
                self._scheduled = True
            self._schedule(self._send)
        paths = [self.leases.path_for(item[0][0]) for item in batch]
        clock = self.leases._clock
        if deletes:
            # Only this session's nodes: an earlier one's are gone with it.
            session_id = self.leases._session_id
            deletes = [lease for lease in deletes
                       if lease.session_id == session_id and not lease.lost]
        if (len(set(paths)) != len(paths) or clock is None
                or any(item[4] != clock[1] for item in batch)
                or (len(batch) == 1 and not deletes)):
            if deletes:
                self.leases.deletes.queue_many(deletes)
            last = len(batch) - 1
            for i, item in enumerate(batch):
                self.try_create(item[0], 0, *item[1:],
                                landed=self._landed if i == last else None)
            return
        try:
            tx = self.leases.client.transaction()
            for lease in deletes:  # first: a freed key may be taken again here
                tx.delete(lease.path)
            for path, item in zip(paths, batch):
                tx.create(path, item[1], ephemeral=True)
            tx.set_data(clock[0], b'')
            async_result = tx.commit_async()
        except Exception:
            self._landed()
            self._apart(batch, deletes)
            return
        self.leases.stats['creates'] += len(batch)
        self.leases.stats['create_batches'] += 1
        if deletes:
            self.leases.stats['deletes'] += len(deletes)
            self.leases.stats['deletes_with_creates'] += len(deletes)
        skip = len(deletes)
        sent_at = time.monotonic()

        def created(result: Any) -> None:
            self._landed()
            try:
                answers = result.get_nowait()
            except ConnectionLoss as exc:
                # Applied or not: reap the creates and the deletes on reconnect.
                self.leases.orphans.add([(p, item[4]) for p, item in zip(paths, batch)]
                                        + [(lease.path, lease.session_id) for lease in deletes])
                for item in batch:
                    item[2](LeaseOutcome.UNAVAILABLE, None, exc)
                return
            except Exception:
                answers = None
            if (not isinstance(answers, list) or len(answers) != skip + len(batch) + 1
                    or any(isinstance(a, Exception) for a in answers)):
                # One key was held (or a node or the clock gone): the multi did
                # nothing, it is atomic; release and ask key by key.
                self._apart(batch, deletes)
                return
            answers = answers[skip:]
            self.leases.deadline.acked(sent_at)
            stat = answers[-1]  # every node of the batch was created at its mzxid
            for item, full in zip(batch, paths):
                self.leases._granted(full, item[0][0], stat.ephemeralOwner, stat.mzxid,
                              item[2], item[3])

        async_result.rawlink(created)

    def _apart(self, batch: List[tuple], deletes: List[Any]) -> None:
        """A multi that could not go out, or did nothing: each part alone."""
        if deletes:
            self.leases.deletes.queue_many(deletes)
        for item in batch:
            self.try_create(item[0], 0, *item[1:])

    def try_create(self, keys: List[str], i: int, data: bytes, callback: Callback,
                   owner: Any, session_id: Optional[int],
                   landed: Optional[Callable[[], None]] = None) -> None:
        """Create ``keys[i]``, else the next slot; ``landed()`` once answered."""
        if landed is not None:
            done = callback

            def callback(outcome: str, lease: Any, exc: Optional[BaseException]) -> None:
                landed()
                done(outcome, lease, exc)
        key = keys[i]
        path = self.leases.path_for(key)
        if session_id != self.leases._session_id or not self.leases.connected:
            # Asked for under a session given up since (a next slot, a batch
            # fallback): sending it now would create under the new session
            # a node recorded under the old one.
            callback(LeaseOutcome.UNAVAILABLE, None, ConnectionLoss('session changed'))
            return
        try:
            async_result = self.leases.client.create_async(
                path, data, ephemeral=True, makepath=True, include_data=True)
        except Exception as exc:  # closed client, bad state
            callback(LeaseOutcome.UNAVAILABLE, None, exc)
            return
        self.leases.stats['creates'] += 1
        sent_at = time.monotonic()

        def created(result: Any) -> None:
            try:
                _, stat = result.get_nowait()
                self.leases.deadline.acked(sent_at)
            except NodeExistsError:
                if i + 1 < len(keys):
                    return self.try_create(keys, i + 1, data, callback, owner, session_id)
                return callback(LeaseOutcome.CONTENDED, None, None)
            except ConnectionLoss as exc:
                # The create may have been applied: reap it on reconnect.
                self.leases.orphans.add([(path, session_id)])
                return callback(LeaseOutcome.UNAVAILABLE, None, exc)
            except Exception as exc:
                return callback(LeaseOutcome.UNAVAILABLE, None, exc)
            self.leases._granted(path, key, stat.ephemeralOwner, stat.czxid, callback, owner)

        async_result.rawlink(created)

