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

from .handoff import origin_of

__all__ = ('reject', 'ack', 'delivery_limit_reached', 'origin_queue', 'store_failure')

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


def origin_queue(consumer: Any, message: Any) -> str:
    """The name of the queue ``message`` was consumed from: the queue parking
    noted (a message handed over from a park queue), its consumer tag
    (RabbitMQ), else the consumed queue its exchange and routing key lead to."""
    noted = origin_of(message)
    if noted:
        return noted
    info = message.delivery_info or {}
    task_consumer = getattr(consumer, 'task_consumer', None)
    tag = info.get('consumer_tag')
    if tag is not None:
        for name, active in (getattr(task_consumer, '_active_tags', None) or {}).items():
            if str(active) == str(tag):
                return name
    queues = list(getattr(task_consumer, 'queues', None) or ())
    routing_key, exchange = info.get('routing_key'), info.get('exchange') or ''
    for queue in queues:
        if queue.routing_key == routing_key and (queue.exchange.name or '') == exchange:
            return queue.name
    names = [q.name for q in queues]
    if routing_key in names or not names:
        return routing_key or 'celery'
    return names[0]
