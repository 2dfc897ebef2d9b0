"""Handing a parked message straight to this worker's consumer.

A worker that refills its waiting room takes the head of the key's park queue
(``basic.get`` on the parking thread's channel) and gives the message to its
own consumer, as if the broker had delivered it there: Celery's task handler
builds the request and the gate sees it arrive. It does not go back to the
tail of its queue of origin, where it would wait behind the rest of a backlog
being parked while the key idles, and it is delivered once.

The message stays unacknowledged on the parking thread's channel; its ack or
reject (Celery's early ack at accept, the late ack, the gate's hand-back) is
done there, on that thread (a channel is not thread-safe), through
:class:`HandedChannel`. It takes no prefetch slot of the consumer's channel,
so the waiting room adds none for it.

Failure cases: if the parking thread's connection drops, the broker puts every
message it had taken and not acknowledged back at the head of its park queue;
an ack for one of them afterwards is void. A request of such a message still
in this worker runs anyway, so the task can run twice (same id, serialised by
its lease: at-least-once, as Celery's own redelivery). Nothing is lost.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ('HandedChannel', 'handed', 'origin_of')

ORIGIN_HEADER = 'x-mutex-origin'


class HandedChannel:
    """Stands for the parking thread's channel in a taken message: kombu's
    ``Message.ack``/``reject`` call these, which queue the call to that thread."""

    no_ack_consumers = None  # kombu's Message.ack looks for it

    def __init__(self, submit: Callable[[tuple], None], generation: int) -> None:
        self._submit = submit
        self.generation = generation  # of the connection the message came on

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        self._submit(('settle', self.generation, delivery_tag, None))

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self._submit(('settle', self.generation, delivery_tag, bool(requeue)))


def handed(message: Any) -> bool:
    """Was ``message`` handed over from a park queue (not delivered on the
    consumer's channel)?"""
    return isinstance(getattr(message, 'channel', None), HandedChannel)


def origin_of(message: Any) -> Optional[str]:
    """The queue a parked message came from (the header parking added)."""
    origin = (getattr(message, 'headers', None) or {}).get(ORIGIN_HEADER)
    return origin if isinstance(origin, str) and origin else None
