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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import ConnectionLoss
from kazoo.retry import KazooRetry

from .creates import CreateBatcher
from .deletes import DeleteBatcher
from .orphans import OrphanReaper
from .outcome import LeaseOutcome
from .probe import probe_namespace
from .session import SessionDeadline
from .shared import SharedLocks
from .watches import Watches
from .zkhandler import default_handler

__all__ = ('Lease', 'LeaseOutcome', 'ZooKeeperLeases')

logger = logging.getLogger(__name__)

# kazoo logs every failed connection attempt; the gate reports outages itself
# at a sane rate, so kazoo's own logger only speaks up for errors by default.
kazoo_logger = logging.getLogger('celery_mutex_bootstep.kazoo')
if kazoo_logger.level == logging.NOTSET:
    kazoo_logger.setLevel(logging.ERROR)



class Lease:
    """One grant of one key to one request in one session."""

    __slots__ = ('path', 'key', 'session_id', 'token', 'acquired_at',
                 'acquired_monotonic', 'owner', 'lost', '_released', '_lock',
                 'parent', '__weakref__')

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
        self.parent: Optional[str] = None  # a reader's: its key's node (shared.py)

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
            **{'handler': default_handler(), **(client_options or {})},
        )
        self._lock = threading.Lock()
        self._held: Dict[str, Lease] = {}
        self._session_id: Optional[int] = None
        # Set when this session may not create or read leases (ACLs).
        self.access_error: Optional[str] = None
        self._connected = False
        self._started = False
        self.stats = {'creates': 0, 'create_batches': 0, 'deletes': 0, 'delete_batches': 0,
                      'deletes_with_creates': 0, 'watches': 0}
        # Acquisitions asked for in one turn of the caller's loop go out as
        # one multi (creates.py); releases are batched (deletes.py); lost
        # replies are reaped (orphans.py).
        self.creates = CreateBatcher(self, schedule)
        self.deletes = DeleteBatcher(self)
        self.orphans = OrphanReaper(self)
        self.watches = Watches(self)
        self.shared = SharedLocks(self)  # readers (mutex_shared)
        # This session's clock node (probe.py): a multi of creates ends with a setData on
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
                owner: Any = None, shared: bool = False) -> None:
        """Try to create a lease node for one of ``keys``, in order; never blocks.

        One key is a mutex; several are the slots of a semaphore (the first
        free slot wins). ``callback(outcome, lease, exc)`` runs on kazoo's
        thread with ``LeaseOutcome.ACQUIRED`` and the lease, ``CONTENDED``
        (every key is held), or ``UNAVAILABLE`` and the error. ``shared``: join
        the key's readers (one key; :mod:`.shared`).
        """
        if isinstance(keys, str):
            keys = (keys,)
        if not self.connected:
            callback(LeaseOutcome.UNAVAILABLE, None, ConnectionLoss('not connected'))
            return
        session_id = self._session_id
        if shared:  # a known-held node may be other readers' parent: always ask
            return self.shared.acquire(keys[0], data, callback, owner, session_id)
        # Nodes whose deletion watch is outstanding are held: no round trip.
        keys = [k for k in keys if not self.watches.known_held(self.path_for(k))]
        if not keys:
            callback(LeaseOutcome.CONTENDED, None, None)
            return
        if len(keys) == 1 and self.creates.add((list(keys), data, callback, owner, session_id)):
            return
        self.creates.try_create(list(keys), 0, data, callback, owner, session_id)

    def _granted(self, path: str, key: str, session_id: int, token: int,
                 callback: Callback, owner: Any, parent: Optional[str] = None) -> None:
        lease = Lease(path, key, session_id, token, owner)
        lease.parent = parent
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

    def watch(self, keys: Sequence[str], callback: Callable[[], None],
              shared: bool = False) -> None:
        """Call ``callback()`` (kazoo's thread) once one of ``keys`` may be free.

        One ZooKeeper watch per node however often asked (:mod:`.watches`); a
        key already free calls back at once. Spurious calls are possible: the
        caller just tries again. ``shared``: for a reader (it may wait for a
        writer-waiting marker instead).
        """
        if self._connected:
            paths = (self.shared.watch_paths(keys) if shared
                     else [self.path_for(k) for k in keys])
            self.watches.watch(paths, callback, reader=shared)

    def release(self, lease: Lease, with_turn: bool = False) -> bool:
        """Delete the lease's node, once. Safe from any thread.

        ``with_turn``: the caller is the consumer thread in a turn of its loop;
        the delete may go out with that turn's creates, at the end of the turn
        (creates.py). Returns False when it was already released.
        """
        if not lease._claim_release():
            return False
        with self._lock:
            if self._held.get(lease.path) is lease:
                del self._held[lease.path]
            same_session = (lease.session_id == self._session_id and not lease.lost)
        if not same_session:
            return True  # gone with its session; the path may be someone else's now
        if lease.parent is not None:
            self.shared.release(lease)
            return True
        if not (with_turn and self.creates.add_delete(lease)):
            self.deletes.queue(lease)
        return True

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
            self.client.handler.spawn(self.orphans.reap)
            probe_namespace(self, session_id)
            name = 'connected'
        elif state == KazooState.SUSPENDED:
            self.watches.reset()
            with self._lock:
                self._connected = False
                self.disconnected_since = time.monotonic()
            name = 'suspended'
        else:
            self.deadline.reset()  # pool processes refuse to start from now on
            self.watches.reset()
            with self._lock:
                self._connected = False
                self._session_id = None
                if self.disconnected_since is None:
                    self.disconnected_since = time.monotonic()
                lost = self._drop_all_locked()
                self.orphans.clear()
            self.shared.reset()
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
        self.watches.reset()
        with self._lock:
            if not self._started:
                return
            self._connected = False
            self._session_id = None
            if self.disconnected_since is None:
                self.disconnected_since = time.monotonic()
            lost = self._drop_all_locked()
            self.orphans.clear()
        self.shared.reset()
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
