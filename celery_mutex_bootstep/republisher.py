"""Republishing messages that must run again, kept until the broker takes them.

A message handed back after it was acknowledged (Celery's default early ack),
or one a quorum queue would drop after too many deliveries, goes back as a
fresh copy: same task id, body and headers, without the delivery count.
Sessions get lost when the network fails, which is exactly when the broker is
away too; so a copy that cannot be published now is kept in memory and
retried, with a backoff up to 2 s, until it is published. The log says so
(WARNING once per message, INFO when it got through).

Guarantees and limits:

* Runs on a thread of its own with a broker connection of its own: the
  consumer thread never waits on the publish, and no channel is shared
  between threads (py-amqp's are not thread-safe).
* ``published(req)`` is called on the consumer thread (through the inbox)
  once the copy is out: it acknowledges the original if that was not done yet.
  A worker that dies between the publish and that ack duplicates the task
  (at-least-once, same task id).
* The one window where a task is lost: the worker process itself dies while
  a copy is kept here (the broker never came back before it did), the same as
  any early-acked Celery task whose worker dies. At shutdown the thread keeps
  trying for a few seconds, then names what it could not publish (ERROR).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Optional

__all__ = ('Republisher', 'confirmed_connection', 'publish_copy', 'publish_message')

logger = logging.getLogger('celery_mutex_bootstep.gate')

_BACKOFF_MAX = 2.0


def publish_copy(producer: Any, req: Any) -> None:
    """Publish a copy of ``req``'s message with ``producer`` (raises on failure):
    to the queue it came from (``req._mutex_origin``, through the default
    exchange), not to its exchange, where a fanout or topic binding would
    deliver the copy to every bound queue again."""
    origin = getattr(req, '_mutex_origin', None)
    if origin:
        publish_message(producer, req.message, '', origin)
        return
    info = req.message.delivery_info or {}
    publish_message(producer, req.message, info.get('exchange') or '', info.get('routing_key'))


def publish_message(producer: Any, message: Any, exchange: str, routing_key: Any,
                    headers: Optional[dict] = None) -> None:
    """Publish ``message`` again (same body, headers and properties; the broker's
    delivery count dropped, ``headers`` added) to ``exchange``/``routing_key``."""
    merged = {k: v for k, v in (message.headers or {}).items() if k != 'x-delivery-count'}
    merged.update(headers or {})
    props = message.properties or {}
    producer.publish(
        message.body, exchange=exchange, routing_key=routing_key, headers=merged,
        content_type=message.content_type, content_encoding=message.content_encoding,
        correlation_id=props.get('correlation_id'), reply_to=props.get('reply_to'),
        priority=props.get('priority'), delivery_mode=props.get('delivery_mode'),
        retry=False)


def confirmed_connection(app: Any) -> Any:
    """A connection of its own whose publishes the broker confirms (RabbitMQ:
    publisher confirms), so "published" means "the broker has it"."""
    connection = app.connection_for_write(transport_options={'confirm_publish': True})
    connection.ensure_connection(max_retries=1, timeout=2)
    return connection


class Republisher:
    def __init__(self, app: Any, post: Callable[..., None],
                 published: Callable[[Any], None]) -> None:
        self.app = app
        self.post = post
        self.published = published
        self._queue: Deque[Any] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._connection: Any = None
        self._producer: Any = None

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, req: Any) -> None:
        """Publish a copy of ``req``'s message, now or once the broker is back."""
        with self._cond:
            self._queue.append(req)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name='mutex-republisher', daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        delay = 0.0
        warned: set = set()
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if not self._queue:
                    return
                req = self._queue[0]
            try:
                publish_copy(self._producer_for(), req)
            except Exception as exc:
                self._drop_connection()
                if self._stop and time.monotonic() > self._give_up_at:
                    return
                if req.id not in warned:
                    warned.add(req.id)
                    logger.warning('mutex: could not republish %s[%s] (%r): kept, and '
                                   'retried until the broker takes it', req.name, req.id, exc)
                delay = min(_BACKOFF_MAX, max(0.1, delay * 2))
                with self._cond:
                    self._cond.wait(delay)
                continue
            delay = 0.0
            with self._cond:
                self._queue.popleft()
            if req.id in warned:
                warned.discard(req.id)
                logger.info('mutex: republished %s[%s] after the broker came back',
                            req.name, req.id)
            self.post(self.published, req)

    def _producer_for(self) -> Any:
        if self._producer is None:
            self._connection = confirmed_connection(self.app)
            self._producer = self._connection.Producer()
        return self._producer

    def _drop_connection(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass

    _give_up_at = float('inf')

    def close(self, timeout: float = 5.0) -> None:
        """Shutdown: keep trying for ``timeout`` seconds, then name what is left."""
        with self._cond:
            self._stop = True
            self._give_up_at = time.monotonic() + timeout
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(timeout + 3)
        left = list(self._queue)
        if left:
            logger.error('mutex: shutting down with %d message(s) not republished (the '
                         'broker is away); these tasks will not run again: %s', len(left),
                         ', '.join(f'{r.name}[{r.id}]' for r in left))
        self._drop_connection()
