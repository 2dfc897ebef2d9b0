"""Leases: ephemeral ZooKeeper nodes held by one session, acquired without blocking.

A lease on key ``K`` is the ephemeral node ``<namespace>/<K>``. One ``create``
acquires it; ``NodeExists`` means another holder has it. The node's data names
the holder; its creation zxid is the lease's fencing token, which grows with
every grant of any node, so a later holder of a key always has a larger token.

Guarantees:

* While this session holds the node, no other session can create it: at most
  one holder per key, cluster-wide, as long as ZooKeeper's quorum holds.
* A crashed or partitioned holder's lease disappears when ZooKeeper expires
  its session (the negotiated session timeout after the server last heard
  from it); no TTL has to run out.
* Release is idempotent and thread-safe, and never deletes another holder's
  node: it only deletes within the session that created the node (the node is
  then certainly ours, since nobody else can create that path while it
  exists); a node of an earlier session is already gone with that session.
* Nothing here waits on ZooKeeper: every call is kazoo's ``*_async`` and
  completes through a callback on kazoo's thread.

Failure cases:

* A ``create`` whose reply is lost with the connection (``ConnectionLoss``)
  may have succeeded. It is reported as unavailable, and once the same session
  reconnects the node is read back and deleted if this session owns it and no
  lease of ours holds it, so a lost reply never leaves a key stuck.
* Session expiry (LOST) ends every lease at once: they are marked ``lost``
  and reported through ``on_lost(leases, None)``; what to do with their
  running holders is the caller's decision. At the session deadline (see
  session.py) the same happens with ``on_lost(leases, wait_until)`` on the
  deadline thread, and the session is closed only once ``on_lost`` returned:
  the caller stops the holders before then, and at the latest by
  ``wait_until``, before the server could expire the session.
* A request sent on a session given up since is not sent again on the next
  one (a semaphore's next slot): its answer says unavailable.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import ConnectionLoss, NoAuthError, NodeExistsError, NoNodeError
from kazoo.retry import KazooRetry

from .session import SessionDeadline

__all__ = ('Lease', 'LeaseOutcome', 'ZooKeeperLeases')

logger = logging.getLogger(__name__)

# kazoo logs every failed connection attempt; the gate reports outages itself
# at a sane rate, so kazoo's own logger only speaks up for errors by default.
kazoo_logger = logging.getLogger('celery_mutex_bootstep.kazoo')
if kazoo_logger.level == logging.NOTSET:
    kazoo_logger.setLevel(logging.ERROR)


_MAX_BATCH = 100


class LeaseOutcome:
    ACQUIRED = 'acquired'
    CONTENDED = 'contended'
    UNAVAILABLE = 'unavailable'


class Lease:
    """One grant of one key to one request in one session."""

    __slots__ = ('path', 'key', 'session_id', 'token', 'acquired_at',
                 'acquired_monotonic', 'owner', 'lost', '_released', '_lock',
                 '__weakref__')

    def __init__(self, path: str, key: str, session_id: int, token: int,
                 owner: Any = None) -> None:
        self.path = path
        self.key = key
        self.session_id = session_id
        self.token = token
        self.acquired_at = time.time()
        self.acquired_monotonic = time.monotonic()
        self.owner = owner
        self.lost = False
        self._released = False
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._released

    def _claim_release(self) -> bool:
        with self._lock:
            if self._released:
                return False
            self._released = True
            return True

    def __repr__(self) -> str:
        state = 'released' if self._released else 'lost' if self.lost else 'held'
        return f'<Lease {self.key[:12]} token={self.token} {state}>'


Callback = Callable[[str, Optional[Lease], Optional[BaseException]], None]


class ZooKeeperLeases:
    """One kazoo session and the leases it holds.

    ``on_state(state)`` is called on kazoo's thread with ``'connected'``,
    ``'suspended'`` or ``'lost'``; ``on_lost(leases)`` with the leases a session
    expiry took away. Both must return quickly and must not call ZooKeeper
    synchronously.
    """

    def __init__(self, hosts: str, namespace: str, *,
                 session_timeout: float = 10.0,
                 session_margin: Optional[float] = None,
                 on_state: Optional[Callable[[str], None]] = None,
                 on_lost: Optional[Callable[[List[Lease], Optional[float]], None]] = None,
                 client: Optional[KazooClient] = None,
                 client_options: Optional[Dict[str, Any]] = None,
                 schedule: Optional[Callable[[Callable[[], None]], Any]] = None) -> None:
        self.hosts = hosts
        self.namespace = namespace.rstrip('/')
        self.session_timeout = session_timeout
        self.on_state = on_state
        self.on_lost = on_lost
        self.client = client or KazooClient(
            hosts=hosts, timeout=session_timeout,
            # kazoo's default backs off up to an hour: a restarted server
            # would then expire sessions we could have kept.
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2,
                                        max_delay=1.0),
            logger=kazoo_logger,
            **(client_options or {}),
        )
        self._lock = threading.Lock()
        self._held: Dict[str, Lease] = {}
        # (path, session id) pairs whose create or delete reply was lost.
        self._orphans: Set[Tuple[str, int]] = set()
        self._session_id: Optional[int] = None
        # Set when this session may not create or read leases (ACLs).
        self.access_error: Optional[str] = None
        self._connected = False
        self._started = False
        # Releases queue here while a batch of deletes is in flight.
        self._to_delete: List[Lease] = []
        self._deleting = False
        self.stats = {'creates': 0, 'create_batches': 0, 'deletes': 0, 'delete_batches': 0,
                      'watches': 0}
        # Acquisitions asked for in one turn of the caller's loop go out as
        # one multi: ``schedule(fn)`` runs fn once the turn is over.
        self._schedule = schedule
        self._to_create: List[tuple] = []
        # This session's clock node: a multi of creates ends with a setData on
        # it, whose answer (mzxid) is the creation zxid of the whole batch.
        self._clock: Optional[Tuple[str, int]] = None
        self.disconnected_since: Optional[float] = time.monotonic()
        self.client.add_listener(self._on_kazoo_state)
        self.deadline = SessionDeadline(self.client, '/', session_timeout,
                                        margin=session_margin,
                                        on_deadline=self._give_up,
                                        session_id=lambda: self._session_id)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if not self._started:
            self._started = True
            self.client.start_async()
            self.deadline.start()

    def close(self) -> None:
        """End the session (its lease nodes vanish). Blocks: shutdown only."""
        if not self._started:
            return
        self._started = False
        self.deadline.stop()
        try:
            self.client.stop()
        finally:
            self.client.close()

    @property
    def connected(self) -> bool:
        """Connected, allowed in the namespace, and certainly alive (deadline)."""
        return self._connected and self.access_error is None and self.deadline.valid()

    @property
    def session_id(self) -> Optional[int]:
        return self._session_id

    def path_for(self, key: str) -> str:
        return f'{self.namespace}/{key}'

    def held(self) -> List[Lease]:
        with self._lock:
            return list(self._held.values())

    # -- acquire / release -------------------------------------------------

    def acquire(self, keys: Sequence[str], data: bytes, callback: Callback,
                owner: Any = None) -> None:
        """Try to create a lease node for one of ``keys``, in order; never blocks.

        One key is a mutex; several are the slots of a semaphore (the first
        free slot wins). ``callback(outcome, lease, exc)`` runs on kazoo's
        thread with ``LeaseOutcome.ACQUIRED`` and the lease, ``CONTENDED``
        (every key is held), or ``UNAVAILABLE`` and the error.
        """
        if isinstance(keys, str):
            keys = (keys,)
        if not self.connected:
            callback(LeaseOutcome.UNAVAILABLE, None, ConnectionLoss('not connected'))
            return
        session_id = self._session_id
        clock = self._clock
        if (self._schedule is not None and len(keys) == 1 and clock is not None
                and clock[1] == session_id):
            self._to_create.append((list(keys), data, callback, owner, session_id))
            if len(self._to_create) == 1:
                self._schedule(self._send_creates)
            return
        self._try_create(list(keys), 0, data, callback, owner, session_id)

    def _send_creates(self) -> None:
        """Send the acquisitions gathered in this turn (caller's thread)."""
        batch, self._to_create = self._to_create[:_MAX_BATCH], self._to_create[_MAX_BATCH:]
        if self._to_create:
            self._schedule(self._send_creates)
        paths = [self.path_for(item[0][0]) for item in batch]
        clock = self._clock
        if (len(batch) == 1 or len(set(paths)) != len(paths) or clock is None
                or any(item[4] != clock[1] for item in batch)):
            for item in batch:
                self._try_create(item[0], 0, *item[1:])
            return
        try:
            tx = self.client.transaction()
            for path, item in zip(paths, batch):
                tx.create(path, item[1], ephemeral=True)
            tx.set_data(clock[0], b'')
            async_result = tx.commit_async()
        except Exception:
            for item in batch:
                self._try_create(item[0], 0, *item[1:])
            return
        self.stats['creates'] += len(batch)
        self.stats['create_batches'] += 1
        sent_at = time.monotonic()

        def created(result: Any) -> None:
            try:
                answers = result.get_nowait()
            except ConnectionLoss as exc:
                self._add_orphans([(p, item[4]) for p, item in zip(paths, batch)])
                for item in batch:
                    item[2](LeaseOutcome.UNAVAILABLE, None, exc)
                return
            except Exception:
                answers = None
            if (not isinstance(answers, list) or len(answers) != len(batch) + 1
                    or any(isinstance(a, Exception) for a in answers)):
                # One key was held (or the clock gone): the multi did nothing,
                # it is atomic; ask key by key.
                for item in batch:
                    self._try_create(item[0], 0, *item[1:])
                return
            self.deadline.acked(sent_at)
            stat = answers[-1]  # every node of the batch was created at its mzxid
            for item, full in zip(batch, paths):
                self._granted(full, item[0][0], stat.ephemeralOwner, stat.mzxid,
                              item[2], item[3])

        async_result.rawlink(created)

    def _try_create(self, keys: List[str], i: int, data: bytes, callback: Callback,
                    owner: Any, session_id: Optional[int]) -> None:
        key = keys[i]
        path = self.path_for(key)
        if session_id != self._session_id or not self.connected:
            # Asked for under a session given up since (a next slot, a batch
            # fallback): sending it now would create under the new session
            # a node recorded under the old one.
            callback(LeaseOutcome.UNAVAILABLE, None, ConnectionLoss('session changed'))
            return
        try:
            async_result = self.client.create_async(
                path, data, ephemeral=True, makepath=True, include_data=True)
        except Exception as exc:  # closed client, bad state
            callback(LeaseOutcome.UNAVAILABLE, None, exc)
            return
        self.stats['creates'] += 1
        sent_at = time.monotonic()

        def created(result: Any) -> None:
            try:
                _, stat = result.get_nowait()
                self.deadline.acked(sent_at)
            except NodeExistsError:
                if i + 1 < len(keys):
                    return self._try_create(keys, i + 1, data, callback, owner, session_id)
                return callback(LeaseOutcome.CONTENDED, None, None)
            except ConnectionLoss as exc:
                # The create may have been applied: reap it on reconnect.
                self._add_orphans([(path, session_id)])
                return callback(LeaseOutcome.UNAVAILABLE, None, exc)
            except Exception as exc:
                return callback(LeaseOutcome.UNAVAILABLE, None, exc)
            self._granted(path, key, stat.ephemeralOwner, stat.czxid, callback, owner)

        async_result.rawlink(created)

    def _granted(self, path: str, key: str, session_id: int, token: int,
                 callback: Callback, owner: Any) -> None:
        lease = Lease(path, key, session_id, token, owner)
        with self._lock:
            self._held[path] = lease
            # The session may have been given up or expired between the
            # server's reply and here; then the lease is not ours to use.
            if self._session_id != lease.session_id or not self.connected:
                lease.lost = True
                del self._held[path]
        if lease.lost:
            return callback(LeaseOutcome.UNAVAILABLE, lease, None)
        callback(LeaseOutcome.ACQUIRED, lease, None)

    def watch(self, keys: Sequence[str], callback: Callable[[], None]) -> None:
        """Call ``callback()`` (kazoo's thread) once one of ``keys`` may be free.

        A one-shot ZooKeeper watch per key; a key already free calls back at
        once. Spurious calls are possible: the caller just tries again.
        """
        if not self._connected:
            return
        for key in keys:
            try:
                result = self.client.exists_async(
                    self.path_for(key), watch=lambda event: callback())
            except Exception:
                return
            self.stats['watches'] += 1

            def checked(result: Any) -> None:
                try:
                    stat = result.get_nowait()
                except Exception:
                    return
                if stat is None:
                    callback()
            result.rawlink(checked)

    def release(self, lease: Lease) -> bool:
        """Delete the lease's node, once. Safe from any thread.

        Returns False when it was already released.
        """
        if not lease._claim_release():
            return False
        with self._lock:
            if self._held.get(lease.path) is lease:
                del self._held[lease.path]
            same_session = (lease.session_id == self._session_id and not lease.lost)
        if not same_session:
            return True  # gone with its session; the path may be someone else's now
        with self._lock:
            self._to_delete.append(lease)
            if self._deleting:
                return True  # the batch in flight sends this one when it returns
            self._deleting = True
        self._send_deletes()
        return True

    def _send_deletes(self) -> None:
        """Send every queued release, batched in one transaction.

        While a batch is in flight new releases accumulate, so a busy worker
        sends few large batches and an idle one single deletes at once.
        """
        with self._lock:
            batch, self._to_delete = self._to_delete, []
            session_id = self._session_id
            if not batch:
                self._deleting = False
                return
            batch = [lease for lease in batch
                     if lease.session_id == session_id and not lease.lost]
        if not batch:
            return self._send_deletes()
        self.stats['deletes'] += len(batch)
        self.stats['delete_batches'] += 1
        try:
            if len(batch) == 1:
                async_result = self.client.delete_async(batch[0].path)
            else:
                tx = self.client.transaction()
                for lease in batch:
                    tx.delete(lease.path)
                async_result = tx.commit_async()
        except Exception:
            logger.exception('mutex: could not release %d lease(s)', len(batch))
            return self._send_deletes()

        def deleted(result: Any) -> None:
            try:
                outcome = result.get_nowait()
            except NoNodeError:
                pass
            except ConnectionLoss:
                self._add_orphans([(lease.path, lease.session_id) for lease in batch])
            except Exception as exc:
                logger.warning('mutex: release of %s failed: %r',
                               ', '.join(lease.path for lease in batch), exc)
            else:
                if isinstance(outcome, list) and any(isinstance(r, Exception) for r in outcome):
                    # One failed delete (a node removed by hand) rolled the
                    # whole batch back: send those one by one.
                    for lease, r in zip(batch, outcome):
                        if not isinstance(r, NoNodeError):
                            self.client.delete_async(lease.path)
            self._send_deletes()

        async_result.rawlink(deleted)

    # -- session events ----------------------------------------------------

    def _on_kazoo_state(self, state: str) -> None:
        # kazoo's thread: record, hand off, never block.
        lost: List[Lease] = []
        if state == KazooState.CONNECTED:
            client_id = self.client.client_id
            session_id = client_id[0] if client_id else None
            with self._lock:
                if self._session_id is not None and session_id != self._session_id:
                    lost = self._drop_all_locked()
                self._session_id = session_id
                self._connected = True
                self.disconnected_since = None
            # The server accepted the session after the connect was sent.
            if self.deadline.connect_sent_at is not None:
                self.deadline.acked(self.deadline.connect_sent_at)
            self.client.handler.spawn(self._reap_orphans)
            self._probe(session_id)
            name = 'connected'
        elif state == KazooState.SUSPENDED:
            with self._lock:
                self._connected = False
                self.disconnected_since = time.monotonic()
            name = 'suspended'
        else:
            self.deadline.reset()  # pool processes refuse to start from now on
            with self._lock:
                self._connected = False
                self._session_id = None
                if self.disconnected_since is None:
                    self.disconnected_since = time.monotonic()
                lost = self._drop_all_locked()
                self._orphans.clear()
            name = 'lost'
        if lost and self.on_lost:
            self.on_lost(lost, None)  # expired already: kill at once, no wait
        if self.on_state:
            self.on_state(name)
        return False  # stay registered

    def _give_up(self) -> None:
        """The session deadline passed (heartbeat thread): assume it expired.

        Its leases are reported lost at once, before another worker can
        acquire them; then the session is closed (if the server still has it,
        its nodes vanish now rather than hold stale leases) and replaced.
        """
        # The server could expire the session from last ack + timeout on:
        # the holders must be gone by then.
        wait_until = time.monotonic() + max(0.0, self.deadline.margin - 0.05)
        self.deadline.reset()
        with self._lock:
            if not self._started:
                return
            self._connected = False
            self._session_id = None
            if self.disconnected_since is None:
                self.disconnected_since = time.monotonic()
            lost = self._drop_all_locked()
            self._orphans.clear()
        logger.error('mutex: no answer from ZooKeeper (%s) within the session deadline '
                     '(negotiated timeout %.1fs, margin %.1fs): treating the session as '
                     'lost', self.hosts, self.deadline.negotiated_timeout, self.deadline.margin)
        if lost and self.on_lost:
            self.on_lost(lost, wait_until)  # kills the holders, on this thread
        if self.on_state:
            self.on_state('lost')
        try:
            self.client.stop()
        except Exception:
            logger.exception('mutex: could not close the old ZooKeeper session')
        if self._started:
            self.client.start_async()

    def _drop_all_locked(self) -> List[Lease]:
        lost = [lease for lease in self._held.values() if not lease.released]
        for lease in lost:
            lease.lost = True
        self._held.clear()
        return lost

    def _probe(self, session_id: Optional[int]) -> None:
        """Check once per session that we may create and read in the namespace.

        Digest credentials are accepted at connect whatever they are; only an
        operation tells whether the namespace's ACL lets us in. The answer is
        logged once, not once per task.
        """
        path = f'{self.namespace}/.clock-{session_id or 0:x}'

        def refused(what: str) -> None:
            self.access_error = (
                f'this worker may not {what} under {self.namespace} in ZooKeeper (the '
                f'namespace ACL refuses its credentials: check mutex_auth / --mutex-auth)')
            logger.error('mutex: %s; guarded tasks will not run and go back to the '
                         'broker', self.access_error)

        def listed(result: Any) -> None:
            try:
                result.get_nowait()
            except NoAuthError:
                return refused('list leases')
            except Exception:
                return
            self.access_error = None
            self.client.get_acls_async(self.namespace).rawlink(checked_acl)

        def checked_acl(result: Any) -> None:
            try:
                acls, _ = result.get_nowait()
            except Exception:
                return
            open_ = [a for a in acls if a.id.scheme == 'world' and a.perms & 8]
            if open_:
                logger.warning('mutex: the namespace %s lets anyone delete leases (ACL '
                               'world:anyone); set mutex_auth so the step protects the '
                               'nodes it creates', self.namespace)

        def created(result: Any) -> None:
            try:
                result.get_nowait()
            except NoAuthError:
                return refused('create leases')
            except NodeExistsError:
                pass
            except Exception:
                return
            if session_id is not None:
                self._clock = (path, session_id)
            self.client.get_children_async(self.namespace).rawlink(listed)

        try:
            self.client.create_async(path, b'', ephemeral=True, makepath=True).rawlink(created)
        except Exception:
            pass

    def _add_orphans(self, orphans: List[Tuple[str, Optional[int]]]) -> None:
        """Nodes this session may own though no reply said so (lost replies)."""
        with self._lock:
            self._orphans.update((p, sid) for p, sid in orphans if sid is not None)
            connected = self._connected
        if connected:  # the reconnect's reaper may already have run
            self.client.handler.spawn(self._reap_orphans)

    def _reap_orphans(self) -> None:
        """Delete nodes this session owns but no lease holds (lost replies).

        An orphan is forgotten only once its delete is confirmed (or the node
        turns out not to be ours); otherwise the next reconnect tries again.
        """
        with self._lock:
            session_id = self._session_id
            self._orphans = {(p, s) for p, s in self._orphans if s == session_id}
            todo = [p for p, _ in self._orphans]
        for path in todo:
            self.client.exists_async(path).rawlink(
                lambda result, path=path: self._reap_one(path, session_id, result))

    def _reap_one(self, path: str, session_id: Optional[int], result: Any) -> None:
        try:
            stat = result.get_nowait()
        except Exception:
            return  # still disconnected: the next CONNECTED retries
        with self._lock:
            ours = (stat is not None and stat.ephemeralOwner == session_id
                    and path not in self._held and self._session_id == session_id)
            if not ours:
                self._orphans.discard((path, session_id))
        if not ours:
            return
        logger.info('mutex: deleting %s, left by a request whose reply was lost', path)

        def deleted(result: Any) -> None:
            try:
                result.get_nowait()
            except NoNodeError:
                pass
            except Exception:
                return  # kept: retried on the next CONNECTED
            with self._lock:
                self._orphans.discard((path, session_id))
        self.client.delete_async(path).rawlink(deleted)
