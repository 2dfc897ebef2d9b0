"""Handing a message back: reject or fail it with a stored result (republishing
lives in republisher.py).

Straight on the kombu message, not through ``Request.reject``: that goes
through ``call_soon``, which waits for the hub's next poll (seconds, in
probes). Every function marks the request acknowledged so nothing acts on its
message twice.
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ('reject', 'ack', 'delivery_limit_reached', 'store_failure')

logger = logging.getLogger('celery_mutex_bootstep.gate')


def reject(req: Any, connection_errors: Any, *, requeue: bool) -> None:
    if req.acknowledged:
        return
    req.acknowledged = True
    req.message.reject_log_error(logger, connection_errors, requeue=requeue)


def ack(req: Any, connection_errors: Any) -> None:
    if req.acknowledged:
        return
    req.acknowledged = True
    req.message.ack_log_error(logger, connection_errors)


def delivery_limit_reached(req: Any, limit: int) -> bool:
    """A quorum queue counted ``limit`` deliveries (``x-delivery-count``): another
    requeue could make it drop or dead-letter the message, so republish instead."""
    count = (req.message.headers or {}).get('x-delivery-count')
    return bool(limit) and isinstance(count, int) and count >= limit


def store_failure(req: Any, exc: Exception) -> None:
    try:
        req.task.backend.mark_as_failure(
            req.id, exc, request=req._context, store_result=req.store_errors)
    except Exception:
        logger.exception('mutex: could not store the failure of %s', req.id)
