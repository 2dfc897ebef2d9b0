"""Lease nodes this session may own though no reply said so, and their reaping.

A ``create`` or ``delete`` whose reply is lost with the connection
(``ConnectionLoss``) may have been applied. Its path is remembered with the
session it was sent on; once that session is connected again, the node is
read back and deleted if this session owns it and no lease of ours holds it,
so a lost reply never leaves a key stuck. An orphan is forgotten only once
its delete is confirmed (or the node turns out not to be ours, or its session
is gone, which took the node with it).
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Set, Tuple

from kazoo.exceptions import NoNodeError

__all__ = ('OrphanReaper',)

logger = logging.getLogger('celery_mutex_bootstep.lease')


class OrphanReaper:
    """The orphans of one :class:`~.lease.ZooKeeperLeases` (any thread)."""

    def __init__(self, leases: Any) -> None:
        self.leases = leases
        # (path, session id) pairs whose create or delete reply was lost.
        self._orphans: Set[Tuple[str, int]] = set()

    def __len__(self) -> int:
        return len(self._orphans)

    def clear(self) -> None:
        """The session is gone, and its nodes with it (caller holds the lock)."""
        self._orphans.clear()

    def add(self, orphans: List[Tuple[str, Optional[int]]]) -> None:
        """Nodes this session may own though no reply said so (lost replies)."""
        with self.leases._lock:
            self._orphans.update((p, sid) for p, sid in orphans if sid is not None)
            connected = self.leases._connected
        if connected:  # the reconnect's reaper may already have run
            self.leases.client.handler.spawn(self.reap)

    def reap(self) -> None:
        """Delete nodes this session owns but no lease holds (lost replies).

        An orphan is forgotten only once its delete is confirmed (or the node
        turns out not to be ours); otherwise the next reconnect tries again.
        """
        with self.leases._lock:
            session_id = self.leases._session_id
            self._orphans = {(p, s) for p, s in self._orphans if s == session_id}
            todo = [p for p, _ in self._orphans]
        for path in todo:
            self.leases.client.exists_async(path).rawlink(
                lambda result, path=path: self._reap_one(path, session_id, result))

    def _reap_one(self, path: str, session_id: Optional[int], result: Any) -> None:
        try:
            stat = result.get_nowait()
        except Exception:
            return  # still disconnected: the next CONNECTED retries
        with self.leases._lock:
            ours = (stat is not None and stat.ephemeralOwner == session_id
                    and path not in self.leases._held and self.leases._session_id == session_id)
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
            with self.leases._lock:
                self._orphans.discard((path, session_id))
        self.leases.client.delete_async(path).rawlink(deleted)
