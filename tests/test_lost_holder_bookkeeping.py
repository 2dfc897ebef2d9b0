"""A holder killed because its session was lost: its message goes back, whatever
order the two reports of its end reach the consumer thread in.

Two things report it. The thread that gave the session up kills the process and
posts the session-loss bookkeeping (``Holders.session_lost``), which hands the
message back. The pool notices the process died and reports WorkerLostError on
the hub (``Request.on_failure``). The deadline thread only posts its bookkeeping
once it has seen the process gone, so the pool's report often comes first: it
must neither settle the message nor release the lease in a way that makes the
bookkeeping skip the request (the task would be lost: never run again).

A real Celery Request (its end methods wrapped as in the worker) and the real
Lease; the ZooKeeper client, the inbox and the pool are fakes.
"""
import time
from types import SimpleNamespace

import pytest
from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import Celery
from celery.contrib.testing.mocks import TaskMessage
from celery.worker.request import Request

from celery_mutex_bootstep import holders as holders_module
from celery_mutex_bootstep import stopping
from celery_mutex_bootstep.holders import Holders
from celery_mutex_bootstep.lease import Lease
from celery_mutex_bootstep.options import MutexSettings

PID = 424242  # the pool process; never signalled (os.kill is faked)


class Inbox:
    """The consumer thread's FIFO, drained by the test when it says so."""

    def __init__(self):
        self.queue = []

    def post(self, fun, *args):
        self.queue.append((fun, args))

    def later(self, delay, fun, *args):
        self.queue.append((fun, args))
        return SimpleNamespace(cancel=lambda: None)

    def drain(self):
        while self.queue:
            fun, args = self.queue.pop(0)
            fun(*args)


class Leases:
    """What Holders uses of ZooKeeperLeases: release once, a deadline."""

    deadline = None

    def __init__(self):
        self.released = []

    def release(self, lease, with_turn=False):
        if not lease._claim_release():
            return False
        self.released.append(lease)
        return True


class Metrics:
    def __init__(self):
        self.counts = {}

    def inc(self, name, n=1):
        self.counts[name] = self.counts.get(name, 0) + n

    def held_for(self, seconds):
        pass


class Republisher:
    def __init__(self):
        self.submitted = []

    def submit(self, req):
        self.submitted.append(req)


@pytest.fixture
def app():
    app = Celery('t', set_as_current=False)

    @app.task(name='t.guarded', mutex_keys=(), acks_late=True)
    def guarded():
        pass

    @app.task(name='t.early', mutex_keys=())
    def early():
        pass

    return app


@pytest.fixture
def world(monkeypatch):
    """os.kill and the process check faked: the pool process dies when killed."""
    killed = []
    monkeypatch.setattr(stopping.os, 'kill', lambda pid, sig: killed.append(pid))
    monkeypatch.setattr(holders_module.os, 'kill', lambda pid, sig: killed.append(pid))
    monkeypatch.setattr(stopping, 'process_alive', lambda pid: pid not in killed)
    monkeypatch.setattr(holders_module, 'process_alive', lambda pid: pid not in killed)
    return killed


def running_holder(app, task_name, acknowledged):
    inbox, leases = Inbox(), Leases()
    consumer = SimpleNamespace(app=app, connection_errors=(), pool=None)
    h = Holders(consumer, leases, Metrics(), MutexSettings.from_app({}), inbox)
    h.republisher = Republisher()
    req = Request(TaskMessage(task_name), app=app, task=app.tasks[task_name])
    req.send_event = lambda *args, **kwargs: None
    lease = Lease('/ns/k', 'k' * 64, session_id=1, token=7)
    h._sweep_timer = SimpleNamespace(cancel=lambda: None)  # no mutex_timeout sweep here
    h.add(req, lease, SimpleNamespace(timeout=60, name=task_name, republish_after=10))
    # The pool accepted it (what on_accepted records), and early acks happened.
    req.worker_pid, req.time_start = PID, 1.0
    req._mutex_started = time.monotonic()
    req.acknowledged = acknowledged
    return h, req, lease, inbox, leases


def lose_session(h, lease):
    """What ZooKeeperLeases and the gate do on the deadline thread."""
    lease.lost = True
    return h.stopper.stop([lease], wait_until=0.0)


def worker_lost(req):
    """The pool's report that the process running ``req`` died (the hub)."""
    try:
        raise WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL).')
    except WorkerLostError:
        req.on_failure(ExceptionInfo(), return_ok=True)


def handed_back(req, h):
    rejected = [c for c in req.message.reject_log_error.call_args_list
                if c.kwargs.get('requeue')]
    return len(rejected) + h.republisher.submitted.count(req)


@pytest.mark.parametrize('death_report_first', [True, False])
def test_an_unacknowledged_holder_killed_for_session_loss_goes_back_once(
        app, world, death_report_first):
    h, req, lease, inbox, leases = running_holder(app, 't.guarded', acknowledged=False)
    stopped = lose_session(h, lease)
    assert world == [PID]
    if death_report_first:
        worker_lost(req)
        inbox.drain()
        h.post(h.session_lost, stopped)
    else:
        h.post(h.session_lost, stopped)
        inbox.drain()
        worker_lost(req)
    inbox.drain()
    assert handed_back(req, h) == 1, 'the killed holder\'s message must go back to the broker'
    req.message.ack_log_error.assert_not_called()
    req.message.ack.assert_not_called()
    assert leases.released == [lease], 'released exactly once'
    assert len(h) == 0


@pytest.mark.parametrize('death_report_first', [True, False])
def test_an_acknowledged_holder_killed_for_session_loss_is_republished_once(
        app, world, death_report_first):
    h, req, lease, inbox, leases = running_holder(app, 't.early', acknowledged=True)
    stopped = lose_session(h, lease)
    if death_report_first:
        worker_lost(req)
        inbox.drain()
        h.post(h.session_lost, stopped)
    else:
        h.post(h.session_lost, stopped)
        inbox.drain()
        worker_lost(req)
    inbox.drain()
    assert h.republisher.submitted == [req], 'the early-acked task must be republished'
    assert leases.released == [lease]


def test_a_holder_that_ended_before_its_session_was_lost_is_not_run_again(app, world):
    # It succeeded and was released before the kill: nothing to hand back.
    h, req, lease, inbox, leases = running_holder(app, 't.guarded', acknowledged=False)
    req.on_success((False, None, 0.01))
    inbox.drain()
    h.post(h.session_lost, lose_session(h, lease))
    inbox.drain()
    assert world == [] and handed_back(req, h) == 0
    assert leases.released == [lease]


def continuing_holder(app, started):
    h, req, lease, inbox, leases = running_holder(app, 't.guarded', acknowledged=False)
    h.settings = MutexSettings.from_app({'mutex_on_session_loss': 'continue'})
    h.stopper.on_session_loss = 'continue'
    if not started:
        req.worker_pid, req.time_start = None, None
    return h, req, lease, inbox, leases


def test_continue_lets_a_running_holder_finish_once_without_running_it_again(app, world):
    h, req, lease, inbox, leases = continuing_holder(app, started=True)
    h.post(h.session_lost, lose_session(h, lease))
    inbox.drain()
    assert world == [], 'mutex_on_session_loss=continue: not killed'
    assert handed_back(req, h) == 0, 'it finishes here: its message must not go back'
    req.on_success((False, None, 0.01))
    inbox.drain()
    assert leases.released == [lease] and len(h) == 0


def test_continue_still_keeps_a_holder_not_started_yet_from_starting(app, world):
    h, req, lease, inbox, leases = continuing_holder(app, started=False)
    h.post(h.session_lost, lose_session(h, lease))
    inbox.drain()
    assert world == []
    assert handed_back(req, h) == 1, 'not started: it goes back, to run with a lease'
    assert req._already_revoked, 'the pool refuses it should it still get there'
    assert leases.released == [lease]
