"""The mutex_timeout sweep measures durations on the monotonic clock."""
import time
from types import SimpleNamespace

from celery_mutex_bootstep.holders import Holders
from celery_mutex_bootstep.options import MutexSettings


class Inbox:
    def post(self, fun, *args):
        fun(*args)

    def later(self, delay, fun, *args):
        return SimpleNamespace(cancel=lambda: None)


class Lease:
    released = False
    key = 'k' * 64
    path = '/ns/k'


def holders_with(req, timeout):
    consumer = SimpleNamespace(app=None, connection_errors=(), pool=None)
    h = Holders(consumer, leases=None, metrics=None, settings=MutexSettings.from_app({}),
                inbox=Inbox())
    lease = Lease()
    h._granted[lease] = req
    h._policy_of[lease] = SimpleNamespace(timeout=timeout, name='t')
    overran = []
    h._overran = lambda req, lease, policy: overran.append(req)
    return h, overran


def test_a_wall_clock_step_does_not_kill_a_holder():
    # The clock was stepped: time_start (wall clock) says it started 2 h ago.
    req = SimpleNamespace(time_start=time.time() - 7200, name='t', id='1')
    req._mutex_started = time.monotonic()
    h, overran = holders_with(req, timeout=60)
    h._sweep_overruns()
    assert overran == []


def test_a_holder_past_its_timeout_is_stopped():
    req = SimpleNamespace(time_start=time.time(), name='t', id='1')
    req._mutex_started = time.monotonic() - 61
    h, overran = holders_with(req, timeout=60)
    h._sweep_overruns()
    assert overran == [req]
