"""Handing a message back: reject, republish, or fail it with a stored result.

Straight on the kombu message, not through ``Request.reject``: that goes
through ``call_soon``, which waits for the hub's next poll (seconds, in
probes). Every function marks the request acknowledged so nothing acts on its
message twice.
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ('reject', 'ack', 'republish', 'store_failure')

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


def republish(app: Any, req: Any, connection_errors: Any) -> bool:
    """Publish a fresh copy of the message (same task id, body and headers, no
    delivery count), then ack the original if it was not acked yet.

    Used where a requeue would lose the task: an already acknowledged message
    (Celery's default early ack) or a quorum queue's delivery limit. A worker
    dying between the publish and the ack duplicates the task (at-least-once).
    """
    message = req.message
    info = message.delivery_info or {}
    headers = {k: v for k, v in (message.headers or {}).items() if k != 'x-delivery-count'}
    props = message.properties or {}
    try:
        with app.producer_or_acquire() as producer:
            producer.publish(
                message.body, exchange=info.get('exchange') or '',
                routing_key=info.get('routing_key'), headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                correlation_id=props.get('correlation_id'),
                reply_to=props.get('reply_to'), priority=props.get('priority'),
                delivery_mode=props.get('delivery_mode'),
                # The producer's connection may be stale (a frozen worker, a
                # broker reset): reconnect rather than lose the task.
                retry=True, retry_policy={'max_retries': 5, 'interval_start': 0,
                                          'interval_step': 0.2, 'interval_max': 1})
    except Exception as exc:
        logger.warning('mutex: could not republish %s[%s]: %r', req.name, req.id, exc)
        return False
    ack(req, connection_errors)
    return True


def store_failure(req: Any, exc: Exception) -> None:
    try:
        req.task.backend.mark_as_failure(
            req.id, exc, request=req._context, store_result=req.store_errors)
    except Exception:
        logger.exception('mutex: could not store the failure of %s', req.id)
