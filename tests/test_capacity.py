"""Counting the pool's places (no hoarding), on real Celery requests' end paths."""
from types import SimpleNamespace

from celery import Celery
from celery.contrib.testing.mocks import TaskMessage
from celery.worker.request import Request
from kombu.utils.uuid import uuid

from celery_mutex_bootstep.capacity import PoolPlaces

app = Celery('capacity', set_as_current=False)


@app.task
def job():
    return 1


def request():
    return Request(TaskMessage(job.name, id=uuid()), app=app, task=job)


class Places:
    def __init__(self, processes, ahead=None):
        self.posted = []
        self.freed = 0
        pool = SimpleNamespace(num_processes=processes)
        self.p = PoolPlaces(SimpleNamespace(pool=pool), self.post, self.on_free, ahead)

    def post(self, fun, *args):
        self.posted.append((fun, args))

    def run_posted(self):
        while self.posted:
            fun, args = self.posted.pop(0)
            fun(*args)

    def on_free(self):
        self.freed += 1


def test_one_lease_ahead_per_process_by_default_and_none_with_ahead_0():
    t = Places(2)
    reqs = [request() for _ in range(4)]
    for r in reqs:
        assert t.p.free()
        t.p.entered(r)
    assert not t.p.free()
    t0 = Places(2, ahead=0)
    t0.p.entered(reqs[0])
    t0.p.trying(reqs[1])  # an attempt in flight takes a place too
    assert not t0.p.free()
    t0.p.tried(reqs[1])
    assert t0.p.free()


def test_every_end_path_frees_the_place_once():
    t = Places(1, ahead=0)
    ok, failed, revoked = request(), request(), request()
    for r in (ok, failed, revoked):
        t.p.entered(r)
    ok.on_success((False, 1, 0.01))
    try:
        raise ValueError('boom')
    except ValueError:
        from billiard.einfo import ExceptionInfo
        failed.on_failure(ExceptionInfo())
    revoked._announce_revoked('revoked', False, None, False)
    t.run_posted()
    assert t.freed == 3 and t.p.free()
    ok.on_success((False, 1, 0.01))  # reported twice: counted once
    t.run_posted()
    assert t.freed == 3


def test_reset_forgets_requests_the_pool_never_started_and_returns_the_line():
    t = Places(1, ahead=0)
    started, dropped, waiting = request(), request(), request()
    t.p.entered(started)
    started.time_start = 1.0
    t.p.entered(dropped)
    t.p.wait(waiting, SimpleNamespace(digest='k'), 1)
    t.p.woken('k')
    assert t.p.reset() == [waiting]
    assert not t.p.pending() and not t.p.free()  # the started one still runs
    started.on_success((False, 1, 0.01))
    t.run_posted()
    assert t.p.free()


def test_woken_keys_come_back_in_wake_order_once():
    t = Places(1)
    for d in ('b', 'a', 'b'):
        t.p.woken(d)
    assert [t.p.next_woken(), t.p.next_woken(), t.p.next_woken()] == ['b', 'a', None]


def test_an_unknown_pool_never_holds_back():
    p = PoolPlaces(SimpleNamespace(), lambda *a: None, lambda: None)
    assert p.processes() is None and p.free()
