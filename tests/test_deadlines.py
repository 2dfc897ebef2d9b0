"""mutex_wait_timeout: validation, the deadline arithmetic, and failing visibly
with the result stored before the message is acknowledged."""
import threading
import time
from types import SimpleNamespace

import pytest
from celery import Celery

from celery_mutex_bootstep.deadlines import Deadlines, known_since
from celery_mutex_bootstep.exceptions import MutexConfigError, MutexContended
from celery_mutex_bootstep.metrics import MutexMetrics
from celery_mutex_bootstep.options import MutexSettings, policy_for_task
from celery_mutex_bootstep.policies import check_combination
from celery_mutex_bootstep.verdicts import Verdicts
from celery_mutex_bootstep.waiting import SINCE_HEADER


@pytest.fixture
def app():
    return Celery('t', broker='memory://', set_as_current=False)


def policies(app, **conf):
    """Check the app's own tasks as the worker does at start (other test modules'
    shared tasks are finalized into every app: leave them out)."""
    settings = MutexSettings.from_app(conf)
    for task in app.tasks.values():
        if task.name.startswith('test_deadlines.'):
            check_combination(task, policy_for_task(task, settings), settings)


def test_task_option_and_app_default(app):
    @app.task(shared=False, mutex_keys=('a',), mutex_wait_timeout=2.5)
    def t(a):
        pass

    @app.task(shared=False, mutex_keys=('a',))
    def u(a):
        pass
    s = MutexSettings.from_app({'mutex_wait_timeout': '7'})
    assert policy_for_task(t, s).wait_timeout == 2.5
    assert policy_for_task(u, s).wait_timeout == 7.0
    assert policy_for_task(u, MutexSettings.from_app({})).wait_timeout is None


@pytest.mark.parametrize('bad', [0, -1, 'soon', True, float('inf')])
def test_a_bad_wait_timeout_names_task_and_option(app, bad):
    @app.task(shared=False, mutex_keys=('a',), mutex_wait_timeout=bad)
    def t(a):
        pass
    with pytest.raises(MutexConfigError) as info:
        policy_for_task(t, MutexSettings.from_app({}))
    assert "task 't" in str(info.value) and 'mutex_wait_timeout' in str(info.value)


def test_a_bad_app_default_names_the_config(app):
    with pytest.raises(MutexConfigError, match='app config mutex_wait_timeout'):
        MutexSettings.from_app({'mutex_wait_timeout': 0})


def test_wait_timeout_with_skip_is_refused_at_start(app):
    @app.task(shared=False, mutex_keys=('a',), mutex_wait_timeout=3, mutex_contended='skip')
    def t(a):
        pass
    with pytest.raises(MutexConfigError, match="task '.*t'.*mutex_wait_timeout.*skip"):
        policies(app)


def test_an_app_default_does_not_break_skip_tasks(app):
    @app.task(shared=False, mutex_keys=('a',), mutex_contended='skip')
    def t(a):
        pass
    policies(app, mutex_wait_timeout=3)


def test_wait_timeout_without_parking_is_refused_at_start(app):
    @app.task(shared=False, mutex_keys=('a',), mutex_wait_timeout=3)
    def t(a):
        pass
    with pytest.raises(MutexConfigError, match='mutex_wait_timeout needs mutex_park'):
        policies(app, mutex_park=False)


# -- the deadline -------------------------------------------------------------

class Req(SimpleNamespace):
    """A request the worker state can keep (hashable, weak-referenceable)."""
    __hash__ = object.__hash__


def request(headers=None, **extra):
    return Req(message=SimpleNamespace(headers=headers or {}), name='proj.t',
                           id='id-1', **extra)


def key(wait_timeout):
    policy = SimpleNamespace(wait_timeout=wait_timeout, contended='requeue')
    return SimpleNamespace(policy=policy, digest='d' * 64, describe=lambda: 'proj.t[a=1]')


class FakeVerdicts:
    def __init__(self):
        self.failed = []

    def failure(self, req, exc, events):
        self.failed.append((req, exc, events))


def test_a_message_that_never_waited_is_not_overdue_and_its_clock_is_not_started():
    d = Deadlines(MutexMetrics(), FakeVerdicts())
    req = request()
    assert d.remaining(req, key(5)) == 5 and not d.overdue(req, key(5))
    assert known_since(req) is None
    assert d.remaining(req, key(None)) is None


def test_the_wait_counts_from_the_header_a_parked_copy_carries():
    d = Deadlines(MutexMetrics(), FakeVerdicts())
    req = request({SINCE_HEADER: time.time() - 10})
    assert d.overdue(req, key(5))
    assert not d.overdue(req, key(20))
    assert 9 < d.remaining(req, key(20)) <= 10


def test_a_since_from_the_future_is_ignored():
    d = Deadlines(MutexMetrics(), FakeVerdicts())
    assert not d.overdue(request({SINCE_HEADER: time.time() + 3600}), key(5))


def test_the_waiters_timer_fires_at_its_deadline_if_that_comes_first():
    d = Deadlines(MutexMetrics(), FakeVerdicts())
    req = request()
    req._mutex_waiting_since = time.time() - 4.0
    assert 0.9 < d.delay(req, key(5), 30.0) <= 1.0
    assert d.delay(req, key(50), 1.0) == 1.0
    assert d.delay(req, key(None), 1.0) == 1.0
    assert 0 < d.delay(req, key(1), 1.0) < 0.1, 'overdue: at once, not never'


def test_expire_fails_with_mutex_contended_naming_the_timeout(caplog):
    verdicts = FakeVerdicts()
    metrics = MutexMetrics()
    d = Deadlines(metrics, verdicts)
    req = request({SINCE_HEADER: time.time() - 6})
    with caplog.at_level('WARNING'):
        d.expire(req, key(5))
    (got, exc, events), = verdicts.failed
    assert got is req and isinstance(exc, MutexContended)
    assert 'mutex_wait_timeout of 5s' in str(exc) and 'proj.t[a=1]' in str(exc)
    assert events[0][0] == 'mutex-wait-timeout'
    assert metrics['wait_timeout'] == 1
    line = caplog.records[-1].getMessage()
    assert 'proj.t[id-1]' in line and 'proj.t[a=1]' in line and 'mutex_wait_timeout' in line


def test_mutex_contended_with_a_reason_survives_the_result_backends_round_trip():
    exc = MutexContended('proj.t', 'proj.t[a=1]', 'waited 6.0s')
    again = MutexContended(*exc.args)
    assert str(again) == str(exc) and again.reason == 'waited 6.0s'
    assert MutexContended(*MutexContended('a', 'b').args).reason == ''


# -- the result before the ack ---------------------------------------------------

class Inbox:
    """Runs posted calls when the test says so (the consumer thread's turn)."""

    def __init__(self):
        self.calls = []
        self.posted = threading.Event()

    def post(self, fun, *args):
        self.calls.append((fun, args))
        self.posted.set()

    def run(self):
        assert self.posted.wait(5)
        for fun, args in self.calls:
            fun(*args)


class Message:
    def __init__(self, log):
        self.log = log

    def ack_log_error(self, logger, errors):
        self.log.append('ack')

    def reject_log_error(self, logger, errors, requeue):
        self.log.append(f'reject requeue={requeue}')


def verdict_request(log, backend):
    req = SimpleNamespace(id='id-1', name='proj.t', acknowledged=False, _context=None,
                          store_errors=True, message=Message(log),
                          task=SimpleNamespace(backend=backend))
    req.send_event = lambda name, **fields: log.append(name)
    return req


def test_the_message_is_acked_only_after_the_failure_is_stored_off_the_consumer_thread():
    log, consumer_thread = [], threading.get_ident()

    class Backend:
        def mark_as_failure(self, task_id, exc, request=None, store_result=True):
            assert threading.get_ident() != consumer_thread
            log.append('stored')
    inbox = Inbox()
    v = Verdicts(SimpleNamespace(connection_errors=()), inbox.post)
    req = verdict_request(log, Backend())
    v.failure(req, MutexContended('proj.t', 'k', 'late'), [('mutex-wait-timeout', {})])
    inbox.run()
    v.close()
    assert log == ['stored', 'mutex-wait-timeout', 'task-failed', 'ack']


def test_a_result_that_cannot_be_stored_hands_the_message_back():
    log = []

    class Backend:
        def mark_as_failure(self, *args, **kwargs):
            raise ConnectionError('backend away')
    inbox = Inbox()
    v = Verdicts(SimpleNamespace(connection_errors=()), inbox.post)
    v.failure(verdict_request(log, Backend()), MutexContended('t', 'k'), [])
    inbox.run()
    v.close()
    assert log == ['reject requeue=True']
