"""Releasing leases: their deletes, batched while a batch is in flight.

A release queues its lease; if no batch is in flight it is sent at once (a
single ``delete``), otherwise it waits for the batch in flight to return and
goes out with every release queued meanwhile, in one ``multi``. So an idle
worker releases without delay and a busy one sends few large batches. Only
leases of the current session are deleted: a node of an earlier session is
gone with it, and its path may be someone else's now.
"""
from __future__ import annotations

import logging
from typing import Any, List

from kazoo.exceptions import ConnectionLoss, NoNodeError

__all__ = ('DeleteBatcher',)

logger = logging.getLogger('celery_mutex_bootstep.lease')


class DeleteBatcher:
    """The deletes of one :class:`~.lease.ZooKeeperLeases` (any thread)."""

    def __init__(self, leases: Any) -> None:
        self.leases = leases
        # Releases queue here while a batch of deletes is in flight.
        self._to_delete: List[Any] = []
        self._deleting = False

    def queue(self, lease: Any) -> None:
        self.queue_many([lease])

    def queue_many(self, leases: List[Any]) -> None:
        with self.leases._lock:
            self._to_delete.extend(leases)
            if self._deleting:
                return  # the batch in flight sends this one when it returns
            self._deleting = True
        self._send()

    def _send(self) -> None:
        """Send every queued release, batched in one transaction.

        While a batch is in flight new releases accumulate, so a busy worker
        sends few large batches and an idle one single deletes at once.
        """
        with self.leases._lock:
            batch, self._to_delete = self._to_delete, []
            session_id = self.leases._session_id
            if not batch:
                self._deleting = False
                return
            batch = [lease for lease in batch
                     if lease.session_id == session_id and not lease.lost]
        if not batch:
            return self._send()
        self.leases.stats['deletes'] += len(batch)
        self.leases.stats['delete_batches'] += 1
        try:
            if len(batch) == 1:
                async_result = self.leases.client.delete_async(batch[0].path)
            else:
                tx = self.leases.client.transaction()
                for lease in batch:
                    tx.delete(lease.path)
                async_result = tx.commit_async()
        except Exception:
            logger.exception('mutex: could not release %d lease(s)', len(batch))
            return self._send()

        def deleted(result: Any) -> None:
            try:
                outcome = result.get_nowait()
            except NoNodeError:
                pass
            except ConnectionLoss:
                self.leases.orphans.add([(lease.path, lease.session_id) for lease in batch])
            except Exception as exc:
                logger.warning('mutex: release of %s failed: %r',
                               ', '.join(lease.path for lease in batch), exc)
            else:
                if isinstance(outcome, list) and any(isinstance(r, Exception) for r in outcome):
                    # One failed delete (a node removed by hand) rolled the
                    # whole batch back: send those one by one.
                    for lease, r in zip(batch, outcome):
                        if not isinstance(r, NoNodeError):
                            self.leases.client.delete_async(lease.path)
            self._send()

        async_result.rawlink(deleted)

