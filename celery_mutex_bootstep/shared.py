"""Shared (read) locks: readers of a key hold it together, never with an exclusive holder.

A reader's lease is an ephemeral child ``<namespace>/<K>/r-<session>-<n>`` of a
*persistent* node at the key's own path ``<namespace>/<K>`` (the *reader
parent*, data version 1). An exclusive holder's lease is the ephemeral node
``<namespace>/<K>`` itself, created exactly as before (:mod:`.creates`). As in
Curator's ``InterProcessReadWriteLock``, with ZooKeeper's own rules as the
checks:

Guarantees:

* No exclusive holder while a reader holds, and no reader while an exclusive
  holder holds. Both claim the one path ``<K>``: an exclusive ``create`` fails
  with ``NodeExists`` while the reader parent exists, and a reader's child
  cannot be created under an ephemeral node (``NoChildrenForEphemerals``). The
  reader parent is deleted only when it has no children (ZooKeeper refuses to
  delete a node with children) and only at version 1 (an exclusive lease node
  is at version 0: a late delete never removes one). So exclusion needs
  nothing from the exclusive side: a worker that does not know the mutex has
  readers still excludes them.
* Readers run together: a join is one atomic ``multi``
  (``create+delete`` of the writer-waiting marker, ``create`` of the parent if
  absent, ``create`` of the child, the session clock's ``setData`` for the
  token), so its checks and the join happen at one zxid.
* Exclusive waiters are not starved: a worker whose exclusive call heads the
  line of a key of a mutex some task reads keeps the ephemeral marker
  ``<namespace>/.writer-waiting-<K>``; a reader's join fails while it exists
  (its ``create`` in the multi fails), so new readers wait, the present ones
  finish, the parent goes and the exclusive call gets the key. The marker goes
  when that worker is granted the key, when its first waiter of the key is no
  longer exclusive, or with its session.
* Session loss kills reader holders exactly as exclusive ones: a reader's
  lease is a :class:`~.lease.Lease` whose path is its child, dropped with the
  session (:mod:`.lease`).

Failure cases:

* A reader that crashes or whose session expires leaves its child to vanish
  with the session, but the parent stays (persistent). A worker whose waiter
  watches the key (:mod:`.watches`) sees a persistent node: if it has no
  children it deletes it (version 1), else it watches its children and
  deletes it once they are gone; the deletion wakes its waiters. Until a
  waiter looks, an empty parent costs nothing but the next exclusive
  arrival's one watch round trip.
* A join whose reply is lost (``ConnectionLoss``) may have been applied: its
  child is named, so the orphan reaper (:mod:`.orphans`) deletes it on
  reconnect; a parent it created is cleaned as above. So is a marker whose
  create's reply was lost.
* A marker whose exclusive waiter left this worker another way (parked,
  revoked, timed out) stays until the key's watch fires here (its holders are
  done), the session reconnects (the gate then rechecks every marked key) or
  ends: new readers meanwhile wait as if the exclusive call were still in line.
* With several exclusive waiters on several workers only one marker exists;
  when its owner is granted the key, the others re-mark at their next try or
  recheck (each second), so at most one wave of readers slips in between.
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from kazoo.exceptions import (ConnectionLoss, NoChildrenForEphemeralsError, NodeExistsError,
                              NoNodeError, RolledBackError, RuntimeInconsistency)

from .outcome import LeaseOutcome

__all__ = ('SharedLocks', 'interpret', 'GRANTED', 'MARKED', 'HELD', 'RETRY_ABSENT',
           'RETRY_PRESENT', 'FAILED')

logger = logging.getLogger('celery_mutex_bootstep.lease')

PARENT_VERSION = 1    # a reader parent is created, then set once: never 0 like a lease node
PARENT_DATA = b'{"shared":true}'
_MAX_TRIES = 4        # parent created / deleted under us: try the other form, this often

# What a join's answer means (interpret):
GRANTED = 'granted'
MARKED = 'marked'              # an exclusive call waits: wait for its marker to go
HELD = 'held'                  # an exclusive holder has the key
RETRY_ABSENT = 'retry-absent'  # the parent was gone: join again, creating it
RETRY_PRESENT = 'retry-present'  # someone created it first: join again under it
FAILED = 'failed'


def join_ops(marker: str, parent: str, child: str, data: bytes, parent_exists: bool,
             clock: Optional[str]) -> List[Tuple[str, tuple, dict]]:
    """The ops of one join, in order (``(method, args, kwargs)`` of a kazoo transaction)."""
    ops: List[Tuple[str, tuple, dict]] = [
        # No exclusive call waits: the marker can be created (and is undone).
        ('create', (marker, b''), {}), ('delete', (marker,), {})]
    if not parent_exists:
        ops += [('create', (parent, b''), {}), ('set_data', (parent, PARENT_DATA), {})]
    # Fails under an ephemeral node: an exclusive holder has the key.
    ops.append(('create', (child, data), {'ephemeral': True}))
    if clock is not None:  # its new mzxid is the join's zxid: the fencing token
        ops.append(('set_data', (clock, b''), {}))
    return ops


def interpret(answers: Any, parent_exists: bool) -> str:
    """What a join's multi answered (one of the constants above)."""
    if not isinstance(answers, list):
        return FAILED
    failed = [(i, a) for i, a in enumerate(answers) if isinstance(a, Exception)
              and not isinstance(a, (RolledBackError, RuntimeInconsistency))]
    if not failed:
        return GRANTED if not any(isinstance(a, Exception) for a in answers) else FAILED
    i, exc = failed[0]
    if i == 0 and isinstance(exc, NodeExistsError):
        return MARKED
    if isinstance(exc, NoChildrenForEphemeralsError):
        return HELD
    child_op = 2 if parent_exists else 4
    if parent_exists and i == child_op and isinstance(exc, NoNodeError):
        return RETRY_ABSENT
    if not parent_exists and i == 2 and isinstance(exc, NodeExistsError):
        return RETRY_PRESENT
    return FAILED


Callback = Callable[[str, Any, Optional[BaseException]], None]


class SharedLocks:
    """The readers, reader parents and writer-waiting markers of one
    :class:`~.lease.ZooKeeperLeases` (any thread; never blocks)."""

    def __init__(self, leases: Any) -> None:
        self.leases = leases
        self._lock = threading.Lock()
        self._n = itertools.count()
        self._markers: Dict[str, Optional[Tuple[str, int]]] = {}  # digest -> ours (None: asked)
        self._blocked: Set[str] = set()     # digests whose last join met a marker
        self._parents: Set[str] = set()     # reader parents whose children we watch

    def marker_path(self, digest: str) -> str:
        return f'{self.leases.namespace}/.writer-waiting-{digest}'

    # -- readers -------------------------------------------------------------

    def acquire(self, key: str, data: bytes, callback: Callback, owner: Any,
                session_id: Optional[int], parent_exists: bool = True, tries: int = 0) -> None:
        """Join the readers of ``key``; ``callback`` as :meth:`ZooKeeperLeases.acquire`."""
        leases = self.leases
        if session_id != leases._session_id or not leases.connected:
            return callback(LeaseOutcome.UNAVAILABLE, None, ConnectionLoss('session changed'))
        parent = leases.path_for(key)
        child = f'{parent}/r-{session_id:x}-{next(self._n)}'
        clock = leases._clock
        clock_path = clock[0] if clock is not None and clock[1] == session_id else None
        ops = join_ops(self.marker_path(key), parent, child, data, parent_exists, clock_path)
        try:
            tx = leases.client.transaction()
            for method, args, kwargs in ops:
                getattr(tx, method)(*args, **kwargs)
            async_result = tx.commit_async()
        except Exception as exc:
            return callback(LeaseOutcome.UNAVAILABLE, None, exc)
        leases.stats['creates'] += 1

        def joined(result: Any) -> None:
            try:
                answers = result.get_nowait()
            except ConnectionLoss as exc:
                leases.orphans.add([(child, session_id)])  # applied or not: reaped
                return callback(LeaseOutcome.UNAVAILABLE, None, exc)
            except Exception as exc:
                return callback(LeaseOutcome.UNAVAILABLE, None, exc)
            meaning = interpret(answers, parent_exists)
            with self._lock:
                if meaning == MARKED:
                    self._blocked.add(key)
                else:
                    self._blocked.discard(key)
            if meaning == GRANTED:
                token = answers[-1].mzxid if clock_path is not None else 0
                return leases._granted(child, key, session_id, token, callback, owner,
                                       parent=parent)
            if meaning in (MARKED, HELD) or (meaning != FAILED and tries + 1 >= _MAX_TRIES):
                return callback(LeaseOutcome.CONTENDED, None, None)
            if meaning in (RETRY_ABSENT, RETRY_PRESENT):
                return self.acquire(key, data, callback, owner, session_id,
                                    meaning == RETRY_PRESENT, tries + 1)
            callback(LeaseOutcome.UNAVAILABLE, None,
                     next((a for a in answers if isinstance(a, Exception)), None)
                     if isinstance(answers, list) else None)

        async_result.rawlink(joined)

    def release(self, lease: Any) -> None:
        """Leave: delete the child, then the parent if it is empty now (both
        pipelined; the second fails harmlessly while other readers hold, or
        when the path is an exclusive lease already: version 0)."""
        client = self.leases.client

        def deleted(result: Any) -> None:
            try:
                result.get_nowait()
            except ConnectionLoss:
                self.leases.orphans.add([(lease.path, lease.session_id)])
            except Exception:
                pass
        try:
            client.delete_async(lease.path).rawlink(deleted)
            client.delete_async(lease.parent, version=PARENT_VERSION).rawlink(_ignore)
        except Exception:
            logger.exception('mutex: could not release the shared lease %s', lease.path)
        self.leases.stats['deletes'] += 1

    def watch_paths(self, keys: Sequence[str]) -> List[str]:
        """What a reader waiting for ``keys`` watches: the marker its last join
        met (it must go first), else the key's node."""
        with self._lock:
            return [self.marker_path(k) if k in self._blocked else self.leases.path_for(k)
                    for k in keys]

    # -- reader parents seen by waiters (stale ones are cleaned) --------------

    def parent_seen(self, path: str, stat: Any) -> None:
        """A waiter's watch found a persistent node at a lease path (a reader
        parent): delete it once it has no children, so its deletion wakes the
        waiters even when the last reader's session expired."""
        if stat.version != PARENT_VERSION:
            return
        if stat.numChildren == 0:
            self._delete_parent(path)
            return
        with self._lock:
            if path in self._parents:
                return
            self._parents.add(path)
        self._watch_children(path)

    def _watch_children(self, path: str) -> None:
        def listed(result: Any) -> None:
            try:
                children = result.get_nowait()
            except Exception:
                children = None  # gone (its deletion fires the waiters) or disconnected
            if not children:
                with self._lock:
                    self._parents.discard(path)
                if children is not None:
                    self._delete_parent(path)
        try:
            self.leases.client.get_children_async(path, watch=self._children_event).rawlink(listed)
        except Exception:
            with self._lock:
                self._parents.discard(path)

    def _children_event(self, event: Any) -> None:
        with self._lock:
            watched = event.path in self._parents
        # Only while someone here still waits for the key (its deletion watch).
        if watched and self.leases.watches.known_held(event.path):
            self._watch_children(event.path)
        else:
            with self._lock:
                self._parents.discard(event.path)

    def _delete_parent(self, path: str) -> None:
        try:
            self.leases.client.delete_async(path, version=PARENT_VERSION).rawlink(_ignore)
        except Exception:
            pass

    # -- exclusive waiters -----------------------------------------------------

    def writer_waits(self, key: str) -> None:
        """An exclusive call of ``key`` waits here: new readers wait behind it."""
        session_id = self.leases._session_id
        if not self.leases.connected:
            return  # the gate re-watches (and so re-marks) once connected
        with self._lock:
            mine = self._markers.get(key, False)
            if mine is None or (mine and mine[1] == session_id) or session_id is None:
                return  # asked for already, or ours in this session
            self._markers[key] = None
        path = self.marker_path(key)

        def created(result: Any) -> None:
            try:
                result.get_nowait()
                ours: Any = (path, session_id)
            except ConnectionLoss:  # applied or not: reaped on reconnect if it is ours
                self.leases.orphans.add([(path, session_id)])
                ours = False
            except Exception:
                ours = False  # another worker's exclusive call marks it: as good
            with self._lock:
                if self._markers.get(key, False) is None:
                    if ours:
                        self._markers[key] = ours
                    else:
                        del self._markers[key]
                    return
            if ours:  # done() came first: it is not wanted any more
                self._delete_marker(ours)
        try:
            self.leases.client.create_async(path, b'', ephemeral=True).rawlink(created)
        except Exception:
            with self._lock:
                self._markers.pop(key, None)

    def writer_done(self, key: str) -> None:
        """No exclusive call of ``key`` waits here any more (granted, or its
        line's head is a reader or nobody): readers may join again."""
        with self._lock:
            if key not in self._markers:
                return
            mine = self._markers.pop(key)
        if mine:
            self._delete_marker(mine)

    def _delete_marker(self, mine: Tuple[str, int]) -> None:
        if mine[1] != self.leases._session_id:
            return  # gone with its session
        try:
            self.leases.client.delete_async(mine[0]).rawlink(_ignore)
        except Exception:
            pass

    def marked(self) -> Set[str]:
        """Keys whose marker this worker keeps (or asked for)."""
        with self._lock:
            return set(self._markers)

    def reset(self) -> None:
        """The session is gone, and its markers with it."""
        with self._lock:
            self._markers.clear()
            self._blocked.clear()
            self._parents.clear()


def _ignore(result: Any) -> None:
    try:
        result.get_nowait()
    except Exception:
        pass
