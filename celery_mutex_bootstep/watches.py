"""Watching lease nodes: one ZooKeeper watch per node, however often asked.

Waiters of a key ask to be called back once one of its nodes (a mutex's one,
a semaphore's slots) may be free. Asking the server each time would pile up
watchers: a semaphore slot held for an hour would collect one per retry of
every waiter. So each node has at most one watch outstanding (kazoo keeps one
watcher per distinct callable; ours is one bound method), and the waiters of a
node are a list here, each called at most once, whichever of its nodes frees
first, and then removed from the others.

A node with a deletion watch outstanding is *known held*: its holder has not
let go since ZooKeeper said it exists (the deletion event would have come
first, in order, on kazoo's thread). Acquiring skips known-held nodes, so a
full semaphore or a held mutex answers "contended" with no round trip; a stale
answer is impossible to act on wrongly, since the waiter it creates is woken by
the very event that ends the staleness.

A persistent node at a lease path is a readers' parent (:mod:`.shared`): it
is known held for exclusive waiters, while a reader waiting for it is called
back at once (it may join the readers); and it is deleted once it has no
children, so a dead reader's parent never holds the key.

Session states: on any disconnection everything here is forgotten (within a
session kazoo re-arms its watches, but a new session has none; the gate
re-watches every waited-for key when the session is back).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Sequence

__all__ = ('Watches',)

_FAILED = object()


class _Once:
    """One waiter's callback, called at most once."""
    __slots__ = ('callback', 'paths', 'done', 'reader')

    def __init__(self, callback: Callable[[], None], paths: Sequence[str],
                 reader: bool = False) -> None:
        self.callback = callback
        self.paths = paths
        self.done = False
        self.reader = reader  # readers' parent there: free for it (shared.py)


class _Node:
    __slots__ = ('armed', 'arming', 'fired', 'waiters', 'parent')

    def __init__(self) -> None:
        self.parent = False  # armed on a readers' parent (persistent): readers may join
        self.armed = False   # a deletion watch is outstanding: the node is held
        self.arming = 0      # exists calls in flight
        self.fired = 0       # events seen (an exists answer older than one is stale)
        self.waiters: List[_Once] = []


class Watches:
    """The watches of one :class:`~.lease.ZooKeeperLeases` (any thread)."""

    def __init__(self, leases: Any) -> None:
        self.leases = leases
        self._lock = threading.Lock()
        self._nodes: Dict[str, _Node] = {}

    def known_held(self, path: str) -> bool:
        node = self._nodes.get(path)
        return node is not None and node.armed

    def watch(self, paths: Sequence[str], callback: Callable[[], None],
              reader: bool = False) -> None:
        """``callback()`` once one of ``paths`` may be free (at once if one is);
        for a ``reader``, a readers' parent is free."""
        once = _Once(callback, paths, reader)
        to_arm = []
        with self._lock:
            for path in paths:
                node = self._nodes.get(path)
                if node is None:
                    node = self._nodes[path] = _Node()
                if reader and node.armed and node.parent:
                    to_arm = []
                    break
                node.waiters.append(once)
                if not node.armed:
                    node.arming += 1
                    to_arm.append((path, node.fired))
            else:
                once = None
        if once is not None:  # it may join the readers now
            return self._call([once])
        for path, fired in to_arm:
            self._arm(path, fired)

    def _arm(self, path: str, fired: int) -> None:
        try:
            result = self.leases.client.exists_async(path, watch=self._event)
        except Exception:  # closed client: the gate re-watches on reconnect
            self._armed(path, fired, _FAILED)
            return
        self.leases.stats['watches'] += 1

        def checked(result: Any) -> None:
            try:
                stat = result.get_nowait()
            except Exception:
                stat = _FAILED
            self._armed(path, fired, stat)
        result.rawlink(checked)

    def _armed(self, path: str, fired: int, stat: Any) -> None:
        """An exists answered (kazoo's completion thread, which is not the one
        delivering watch events: the event may already have been seen)."""
        fire = False
        parent = False
        with self._lock:
            node = self._nodes.get(path)
            if node is None:
                return
            node.arming -= 1
            if stat is _FAILED:
                pass  # nothing armed; the gate re-watches once reconnected
            elif stat is None:
                fire = True  # free now
            elif node.fired == fired:
                node.armed = True
                # Persistent: readers' parent (shared.py): cleaned once empty.
                parent = node.parent = not stat.ephemeralOwner
            else:
                fire = True  # it was deleted meanwhile
            self._tidy(path, node)
        if fire:
            self._fire(path)
        elif parent:
            self.leases.shared.parent_seen(path, stat)
            self._fire(path, readers_only=True)

    def _event(self, event: Any) -> None:
        path = event.path
        with self._lock:
            node = self._nodes.get(path)
            if node is not None:
                node.armed = node.parent = False
                node.fired += 1
        self._fire(path)

    def _fire(self, path: str, readers_only: bool = False) -> None:
        with self._lock:
            node = self._nodes.get(path)
            if node is None:
                return
            due = [w for w in node.waiters if not w.done and (w.reader or not readers_only)]
            node.waiters = [w for w in node.waiters if not w.done and w not in due]
            for w in due:
                w.done = True
                for other in w.paths:  # it is woken: its other nodes forget it
                    peer = self._nodes.get(other)
                    if other != path and peer is not None:
                        peer.waiters = [x for x in peer.waiters if x is not w]
                        self._tidy(other, peer)
            self._tidy(path, node)
        self._call(due)

    @staticmethod
    def _call(due: List[_Once]) -> None:
        for w in due:
            w.done = True
            try:
                w.callback()
            except Exception:
                pass  # callbacks only post to the caller's thread

    def _tidy(self, path: str, node: _Node) -> None:
        if not (node.armed or node.arming or node.waiters):
            del self._nodes[path]

    def reset(self) -> None:
        """Disconnected: forget what the server may no longer watch."""
        with self._lock:
            self._nodes.clear()

    def __len__(self) -> int:
        """Waiters registered (stays bounded: one per waiting key and node)."""
        with self._lock:
            return sum(len(n.waiters) for n in self._nodes.values())
