"""The park queues: where a key's waiters wait on the broker, in order.

A worker keeps only a few waiters per key in its consumer (:mod:`.waiting`);
the rest are *parked*: a copy of the message goes to the key's park queue
``celery-mutex.park.<namespace hash>.<digest>`` (durable, declared with the origin queue's
``x-queue-type``), and the original is acknowledged only once the broker has
confirmed the copy. A parked message costs no prefetch slot, no memory in any
worker and no delivery until it is *unparked*: taken from the head of its park
queue (``basic.get``), published to the tail of its queue of origin (header
``x-mutex-origin``) with the header ``x-mutex-unparked``, then acknowledged.
So other keys' messages never queue behind a hot key, and a key's waiters
leave its park queue in the order they were parked.

Who unparks (:mod:`.parked`): the worker whose consumer sees the key's waiters
thin out (a grant, a free key) takes the head and hands it to its own consumer
(:mod:`.handoff`: delivered once, at ZooKeeper's pace, not behind a backlog);
for park queues no live worker knows of (their parkers crashed), every
worker's sweep moves the head to its queue of origin: each parked key has a
persistent node ``<namespace>/.parked/<digest>`` naming its queue and lease
nodes; every ``sweep_every`` seconds a worker unparks one message of each key
that is free, and deletes the node of a park queue found empty.

Guarantees and limits:

* Nothing is lost: the original is acked after the broker confirmed the copy;
  an unparked message is acked after its copy reached the origin queue. A
  crash in between duplicates the task (same id; the lease still serialises
  it: at-least-once, as Celery's own delivery).
* Runs on one thread of its own with its own broker connection: the consumer
  thread never waits on the broker or on ZooKeeper for it.
* Park queues are not deleted (RabbitMQ's ``x-expires`` would delete one
  holding messages): one empty durable queue stays per key that was ever
  parked on RabbitMQ (Redis drops empty lists itself).

What waits is visible without asking the broker (:mod:`.parked_view`): a parked
copy carries when it first waited (``x-mutex-waiting-since``) and when it was
parked (``x-mutex-parked-at``); each sweep also counts the messages of the park
queues this worker follows (``queue_declare``'s message count).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional, Sequence

from kombu import Queue

from .handoff import ORIGIN_HEADER, HandedChannel
from .parked_view import ParkedView
from .republisher import confirmed_connection, publish_message
from .waiting import SINCE_HEADER, waiting_since

__all__ = ('ParkingLot', 'park_queue_name', 'ORIGIN_HEADER', 'UNPARKED_HEADER',
           'PARKED_AT_HEADER')

logger = logging.getLogger('celery_mutex_bootstep.gate')

UNPARKED_HEADER = 'x-mutex-unparked'
PARKED_AT_HEADER = 'x-mutex-parked-at'
PARK_PREFIX = 'celery-mutex.park.'
SWEEP_EVERY = 5.0
_ZK_WAIT = 5.0
# Park queues counted per sweep (the least recently counted first): one round
# trip each, so a worker following thousands of hot keys does not flood the broker.
MEASURE_PER_SWEEP = 100


def park_queue_name(namespace: str, digest: str) -> str:
    """``celery-mutex.park.<namespace hash>.<digest>``: apps in different
    namespaces never share a key, so they never share a park queue either."""
    space = hashlib.sha256(namespace.encode()).hexdigest()[:8]
    return f'{PARK_PREFIX}{space}.{digest}'


def _queue(name: str, queue_type: Optional[str]) -> Queue:
    arguments = {'x-queue-type': queue_type} if queue_type else None
    return Queue(name, exchange='', routing_key=name, durable=True, auto_delete=False,
                 queue_arguments=arguments)


class ParkingLot:
    """The broker side of parking: park, unpark and sweep, on one thread."""

    def __init__(self, app: Any, leases: Any, post: Callable[..., None],
                 sweep_every: float = SWEEP_EVERY) -> None:
        self.app = app
        self.leases = leases
        self.post = post
        self.sweep_every = sweep_every
        self.root = f'{leases.namespace}/.parked'
        self.known: Callable[[], Sequence[str]] = lambda: ()  # keys this worker tracks
        self._jobs: Deque[tuple] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._connection: Any = None
        self._producer: Any = None
        self._declared: set = set()
        self._busy = False
        self.view = ParkedView()
        self._types: Dict[str, Optional[str]] = {}  # digest -> x-queue-type, as used
        self._generation = 0  # of the connection: a taken message's ack needs its own

    # -- asked for on the consumer thread -----------------------------------

    def park(self, req: Any, digest: str, origin: str, queue_type: Optional[str],
             done: Callable[[Any, bool], None]) -> None:
        """Copy ``req``'s message to the park queue; ``done(req, ok)`` follows."""
        self._submit(('park', req, digest, origin, queue_type, done))

    def unpark(self, digest: str, queue_type: Optional[str],
               done: Callable[[str, Optional[bool]], None]) -> None:
        """Move the head of ``digest``'s park queue to its origin; ``done(digest,
        got)`` follows: True moved one, False the park queue was empty, None failed."""
        self._submit(('unpark', digest, queue_type, done))

    def take(self, digest: str, queue_type: Optional[str],
             done: Callable[[str, Any], None]) -> None:
        """Take the head of ``digest``'s park queue for this worker's consumer;
        ``done(digest, message)`` follows: a message (acked through this thread
        when its request says so), False when the park queue was empty, None
        when it failed."""
        self._submit(('take', digest, queue_type, done))

    def register(self, digest: str, paths: Sequence[str], queue_type: Optional[str],
                 mutex: Optional[str] = None) -> None:
        """Name the park queue in ZooKeeper, for the sweeps and ``celery mutex list``
        (asynchronous). ``mutex`` is the mutex name only: key values stay in lease
        nodes, where ``mutex_store_values`` decides."""
        data = json.dumps({'queue': park_queue_name(self.leases.namespace, digest),
                           'paths': list(paths), 'queue_type': queue_type,
                           'mutex': mutex}).encode()
        try:
            self.leases.client.create_async(f'{self.root}/{digest}', data, makepath=True)
        except Exception:  # no session now: a later park registers it
            pass

    def _submit(self, job: tuple) -> None:
        with self._cond:
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name='mutex-parking', daemon=True)
                self._thread.start()
            self._cond.notify()

    def start(self) -> None:
        """Start sweeping (at once: a restarted fleet finds what it parked)."""
        self._submit(('sweep',))

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_every
        settles: list = []
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    wait = next_sweep - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stop:
                    settles = [j for j in self._jobs if j[0] == 'settle']
                    self._jobs.clear()
                    break
                due = time.monotonic() >= next_sweep
                job = ('sweep',) if due or not self._jobs else self._jobs.popleft()
                self._busy = True
            try:
                self._do(job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            if job[0] == 'sweep':
                next_sweep = time.monotonic() + self.sweep_every
        for job in settles:  # acks asked for before the close: not lost
            self._settle(*job[1:])

    def _do(self, job: tuple) -> None:
        if job[0] == 'sweep':
            self._sweep()
        elif job[0] == 'park':
            self._park(*job[1:])
        elif job[0] == 'settle':
            self._settle(*job[1:])
        elif job[0] == 'take':
            _, digest, queue_type, done = job
            self.post(done, digest, self._take(digest, queue_type))
        else:
            _, digest, queue_type, done = job
            self.post(done, digest, self._unpark(digest, queue_type))

    def _park(self, req: Any, digest: str, origin: str, queue_type: Optional[str],
              done: Callable[[Any, bool], None]) -> None:
        name = park_queue_name(self.leases.namespace, digest)
        self._types[digest] = queue_type
        since, parked_at = waiting_since(req), time.time()
        try:
            producer = self._producer_for()
            self._declare(name, queue_type)
            publish_message(producer, req.message, '', name, {
                ORIGIN_HEADER: origin, SINCE_HEADER: since, PARKED_AT_HEADER: parked_at})
        except Exception as exc:
            self._drop_connection()
            logger.warning('mutex: could not park %s[%s] (%r); it goes back to its queue',
                           req.name, req.id, exc)
            self.post(done, req, False)
            return
        self.view.parked(digest, parked_at, since)
        self.post(done, req, True)

    def _head(self, digest: str, queue_type: Optional[str]) -> Any:
        """Take the head of ``digest``'s park queue, unacknowledged; None when
        it is empty. Raises on a broker error."""
        name = park_queue_name(self.leases.namespace, digest)
        self._types[digest] = queue_type
        producer = self._producer_for()
        self._declare(name, queue_type)
        message = _queue(name, queue_type)(producer.channel).get(no_ack=False)
        if message is None:
            self.view.measured(digest, 0)
        return message

    def _left_line(self, digest: str, message: Any) -> None:
        parked_at = (message.headers or {}).get(PARKED_AT_HEADER)
        self.view.unparked(digest, parked_at if isinstance(parked_at, (int, float)) else None)

    def _unpark_failed(self, digest: str, exc: Exception) -> None:
        # What was taken and not acked goes back to the head of its park queue.
        self._drop_connection()
        logger.warning('mutex: could not unpark from %s (%r); retried later',
                       park_queue_name(self.leases.namespace, digest), exc)

    def _unpark(self, digest: str, queue_type: Optional[str]) -> Optional[bool]:
        """Move the head to the tail of its queue of origin (sweeps)."""
        try:
            message = self._head(digest, queue_type)
            if message is None:
                return False
            origin = (message.headers or {}).get(ORIGIN_HEADER) or 'celery'
            publish_message(self._producer, message, '', origin, {UNPARKED_HEADER: 1})
            message.ack()
        except Exception as exc:
            self._unpark_failed(digest, exc)
            return None
        self._left_line(digest, message)
        return True

    def _take(self, digest: str, queue_type: Optional[str]) -> Any:
        """Take the head for this worker's consumer (:mod:`.handoff`)."""
        try:
            message = self._head(digest, queue_type)
        except Exception as exc:
            self._unpark_failed(digest, exc)
            return None
        if message is None:
            return False
        self._left_line(digest, message)
        headers = message.headers or {}
        # As the task sees it: delivered from its queue, not from the park queue.
        name = park_queue_name(self.leases.namespace, digest)
        message.delivery_info.update(exchange='', routing_key=headers.get(ORIGIN_HEADER) or name)
        message.channel = HandedChannel(self._submit, self._generation)
        return message

    def _settle(self, generation: int, delivery_tag: Any, requeue: Optional[bool]) -> None:
        """Ack (``requeue`` None) or reject a taken message, on its channel."""
        if generation != self._generation or self._producer is None:
            return  # its connection is gone: the broker put it back already
        try:
            channel = self._producer.channel
            if requeue is None:
                channel.basic_ack(delivery_tag)
            else:
                channel.basic_reject(delivery_tag, requeue=requeue)
        except Exception as exc:
            self._drop_connection()
            logger.warning('mutex: could not acknowledge a message taken from a park queue '
                           '(%r); the broker puts it back (it may run twice)', exc)

    def _sweep(self) -> None:
        """Unpark one message of every registered key that is free and that this
        worker does not track (their parker may have died)."""
        self._measure()
        client = self.leases.client
        if not self.leases.connected:
            return
        wait = _ZK_WAIT  # kazoo's plain calls wait for a lost connection forever
        try:
            children = client.get_children_async(self.root).get(timeout=wait)
        except Exception:  # no node yet, no session: next time
            return
        known = set(self.known())
        for digest in children:
            if digest in known:
                continue
            path = f'{self.root}/{digest}'
            try:
                info = json.loads(client.get_async(path).get(timeout=wait)[0] or b'{}')
                paths = info.get('paths') or ()
                stats = [client.exists_async(p).get(timeout=wait) for p in paths]
                for p, stat in zip(paths, stats):
                    if stat is not None and not stat.ephemeralOwner:
                        self.leases.shared.parent_seen(p, stat)  # readers' parent (shared.py)
                if all(stat is not None and (stat.ephemeralOwner or stat.numChildren)
                       for stat in stats):
                    continue  # held: its holder's worker or a later sweep moves it
                got = self._unpark(digest, info.get('queue_type'))
                if got is False:
                    client.delete_async(path)
                elif got:
                    logger.info('mutex: unparked a message of %s left by another worker',
                                digest[:12])
            except Exception as exc:
                logger.debug('mutex: sweep of %s: %r', digest[:12], exc)

    def _measure(self) -> None:
        """Count the messages in the park queues of the keys this worker follows."""
        known = set(self.known())
        self.view.retain(known)
        for digest in [d for d in self._types if d not in known]:
            del self._types[digest]
        for digest in self.view.due(list(self._types), MEASURE_PER_SWEEP):
            name = park_queue_name(self.leases.namespace, digest)
            try:
                producer = self._producer_for()
                # Declared as parking declares it (a passive declare of a queue
                # Redis dropped once empty would fail): the same queue, its count.
                ok = _queue(name, self._types[digest])(producer.channel).queue_declare()
            except Exception as exc:
                self._drop_connection()
                logger.debug('mutex: could not count %s (%r)', name, exc)
                return
            self._declared.add(name)
            self.view.measured(digest, ok.message_count)

    # -- connection --------------------------------------------------------

    def _declare(self, name: str, queue_type: Optional[str]) -> None:
        if name not in self._declared:
            _queue(name, queue_type)(self._producer.channel).declare()
            self._declared.add(name)

    def _producer_for(self) -> Any:
        if self._producer is None:
            self._connection = confirmed_connection(self.app)
            self._producer = self._connection.Producer()
            self._declared.clear()
            self._generation += 1
        return self._producer

    def _drop_connection(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass

    def wait_idle(self, timeout: float) -> None:
        """Warm shutdown: let the parks asked for finish (bounded), so their
        originals can be acknowledged before the channel closes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (any(j[0] == 'park' for j in self._jobs) or self._busy) and self._thread:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(10)
        self._drop_connection()

    def pending(self) -> Dict[str, int]:
        return {'jobs': len(self._jobs)}
