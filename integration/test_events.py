"""The step's task events reach a real event receiver (worker started with -E).

``mutex-contended`` and ``mutex-requeued`` (a waiter whose requeue
delay passes while the key is still held), ``mutex-skipped``
(``mutex_contended='skip'``) and ``mutex-lost`` (the worker's ZooKeeper
session given up while a holder runs), each carrying the task's uuid and the
key. A receiver on the broker captures every event by type in a thread and
feeds them to ``celery.events.state.State`` (what Flower uses), which must show
a waited-then-run task STARTED then SUCCESS, a revoked waiter REVOKED and a
skipped call FAILURE: none of the step's events may become a task state.
"""
import collections
import re
import threading
import time

import pytest

from .scenario import wait_for
from .test_migration import MigrationScenario

SESSION_TIMEOUT = 4  # seconds; the private ZooKeeper ticks every 500 ms


class EventCapture:
    """``app.events.Receiver`` in a thread: every event, by type."""

    def __init__(self, app):
        self.app = app
        self.events = collections.defaultdict(list)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._receiver = None
        self._error = None
        self._thread = threading.Thread(target=self._run, name='event-capture', daemon=True)
        self.state = app.events.State()
        self.history = collections.defaultdict(list)

    def start(self, timeout=15):
        self._thread.start()
        if not self._ready.wait(timeout):
            raise AssertionError(f'the event receiver did not start: {self._error!r}')
        return self

    def _run(self):
        ready = self._ready
        base = self.app.events.Receiver

        class Receiver(base):
            def on_consume_ready(self, *args, **kwargs):
                super().on_consume_ready(*args, **kwargs)
                ready.set()  # the queue is bound: no event is missed from here on

        try:
            with self.app.connection_for_read() as conn:
                self._receiver = Receiver(conn, handlers={'*': self._on_event})
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception as exc:  # reported by start() or the assertions
            self._error = exc

    def _on_event(self, event):
        with self._lock:
            self.events[event['type']].append(dict(event))
            # What Flower and `celery events` see: feed celery.events.state.State
            # and record each task's state after every event, in arrival order, so
            # the assertions need no timing.
            self.state.event(event)
            uuid = event.get('uuid')
            task = self.state.tasks.get(uuid) if uuid else None
            if task is not None:
                self.history[uuid].append((event['type'], task.state))

    def of(self, type_, uuid=None):
        with self._lock:
            return [e for e in self.events[type_] if uuid is None or e.get('uuid') == uuid]

    def wait(self, type_, uuid, timeout=20):
        return wait_for(lambda: self.of(type_, uuid), timeout=timeout,
                        message=f'{type_} event of {uuid} (seen: {self.summary()})')

    def summary(self):
        with self._lock:
            return {t: len(v) for t, v in self.events.items() if t.startswith(('task-', 'mutex-'))}

    def stop(self):
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)


@pytest.fixture
def escenario(request, worker_factory, zk, rabbitmq_url, redis_url):
    def factory(app, **kwargs):
        return worker_factory(app, wait=False, **kwargs)
    s = MigrationScenario(factory, zk.hosts, rabbitmq_url, 'events')
    yield s
    s.close()


@pytest.fixture
def capture(escenario):
    c = EventCapture(escenario.client).start()
    yield c
    c.stop()


def digest_of(s, task, *values):
    return s.lease_path(task, *values).rsplit('/', 1)[1]


def test_contended_requeued_and_skipped_events(escenario, capture, zk):
    s = escenario
    w = s.worker('w1', concurrency=4, extra_args=['-E'], env={'TEST_PARK': '0'})
    holder = s.send('work', 'ev', 1.5, 0)
    skip_holder = s.send('skipper', 'sk', 1.5)
    capture.wait('task-started', holder.id)
    capture.wait('task-started', skip_holder.id)
    waiter = s.send('work', 'ev', 0, 1)   # requeue delay 0.2 s: requeued while held
    skipped = s.send('skipper', 'sk', 0)

    key = digest_of(s, 'work', 'ev')
    contended = capture.wait('mutex-contended', waiter.id)[0]
    assert contended['key'] == key and "key='ev'" in contended['mutex']
    # with parking off, the waiter goes back to the broker after its 0.2 s delay
    requeued = capture.wait('mutex-requeued', waiter.id)[0]
    assert requeued['key'] == key
    assert requeued['timestamp'] >= contended['timestamp']

    skip = capture.wait('mutex-skipped', skipped.id)[0]
    assert skip['key'] == digest_of(s, 'skipper', 'sk') and "key='sk'" in skip['mutex']
    with pytest.raises(Exception) as info:
        skipped.get(timeout=20)
    assert type(info.value).__name__ == 'MutexContended'
    # Monitors (celery.events.state.State, Flower) must see the skip as a failure.
    failed = capture.wait('task-failed', skipped.id)[0]
    assert 'MutexContended' in failed['exception']

    assert waiter.get(timeout=20) == 1 and holder.get(timeout=20) == 0
    skip_holder.get(timeout=20)
    # the holders were never contended; the skipped call was never requeued
    assert capture.of('mutex-contended', holder.id) == []
    assert capture.of('mutex-requeued', skipped.id) == []
    assert capture.of('mutex-parked', skipped.id) == []
    # the pool processes' LockTask sessions follow --mutex-hosts (no ZOOKEEPER_HOSTS here)
    info = s.send('lock_session_of_process', 'flag').get(timeout=20)
    assert info['hosts'] == zk.hosts and info['acquired'] is True
    assert w.is_running()


def states_of(capture, uuid):
    """The task's states as celery.events.state.State saw them, repeats dropped."""
    with capture._lock:
        seen = [state for _, state in capture.history[uuid]]
    return [st for i, st in enumerate(seen) if i == 0 or seen[i - 1] != st]


def test_monitor_state_of_waited_revoked_and_skipped_tasks(escenario, capture):
    """Flower's view (celery.events.state.State) of tasks the mutex held back."""
    s = escenario
    s.worker('w1', concurrency=4, extra_args=['-E'])
    holder = s.send('work', 'st', 1.5, 0)
    revoke_holder = s.send('work', 'rv', 3.0, 0)
    skip_holder = s.send('skipper', 'sk2', 1.5)
    for r in (holder, revoke_holder, skip_holder):
        capture.wait('task-started', r.id)
    waiter = s.send('work', 'st', 0, 1)
    revoked = s.send('work', 'rv', 0, 1)
    skipped = s.send('skipper', 'sk2', 0)

    capture.wait('mutex-contended', waiter.id)
    capture.wait('mutex-contended', revoked.id)
    s.client.control.revoke(revoked.id)
    capture.wait('task-revoked', revoked.id)
    assert waiter.get(timeout=20) == 1
    capture.wait('task-succeeded', waiter.id)
    capture.wait('task-failed', skipped.id)
    revoke_holder.get(timeout=20)

    waited = states_of(capture, waiter.id)
    assert not any(st.startswith('MUTEX') for st in waited), waited
    assert waited[-2:] == ['STARTED', 'SUCCESS'], waited
    with capture._lock:
        assert capture.state.tasks[waiter.id].state == 'SUCCESS'
        assert capture.state.tasks[revoked.id].state == 'REVOKED'
        assert capture.state.tasks[skipped.id].state == 'FAILURE'
    assert 'STARTED' not in states_of(capture, revoked.id)
    assert 'STARTED' not in states_of(capture, skipped.id)


def test_lost_event_when_the_session_is_given_up(escenario, capture, zk_factory):
    s = escenario
    node = zk_factory()
    s.zk_hosts = node.hosts
    w = s.worker('w1', concurrency=2, hosts=node.hosts, extra_args=[
        '-E', '--mutex-session-timeout', str(SESSION_TIMEOUT)])
    holder = s.send('work', 'lost', 20.0, 0)
    capture.wait('task-started', holder.id)
    key = digest_of(s, 'work', 'lost')
    assert s.zk.exists(f'{s.namespace}/{key}')
    s.zk.stop()
    t0 = time.monotonic()
    node.stop()
    try:
        # Sent while ZooKeeper is still down (it is started only once the event
        # came): the order is the guarantee, the delay the machine's business.
        lost = capture.wait('mutex-lost', holder.id, timeout=30)[0]
        took = time.monotonic() - t0
    finally:
        node.start()
        node.wait_ready()
    assert lost['key'] == key
    print(f'mutex-lost {took:.2f}s after ZooKeeper stopped (session timeout '
          f'{SESSION_TIMEOUT}s)')
    # The holder was stopped (mutex_on_session_loss=kill) and its message handed
    # back; do not let its 20 s run again hold up the teardown.
    s.client.control.revoke(holder.id)
    w.wait_for_log(re.escape(holder.id) + r'.*ZooKeeper session.*killing it', timeout=5,
                   what='the holder killed for its lost lease')
