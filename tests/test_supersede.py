"""mutex_contended='coalesce': which of two calls of a key is superseded, and
the combinations refused at start."""
import time
from types import SimpleNamespace

import pytest
from celery import Celery

from celery_mutex_bootstep.exceptions import MutexConfigError
from celery_mutex_bootstep.metrics import MutexMetrics
from celery_mutex_bootstep.options import MutexSettings, policy_for_task
from celery_mutex_bootstep.policies import MutexPolicies, check_combination
from celery_mutex_bootstep.supersede import Coalescing
from celery_mutex_bootstep.waiting import SINCE_HEADER, WaitingRoom


class Req(SimpleNamespace):
    __hash__ = object.__hash__


def req(id, headers=None):
    return Req(id=id, name='proj.refresh', message=SimpleNamespace(headers=headers or {}))


KEY = SimpleNamespace(digest='d' * 64, describe=lambda: 'proj.refresh[key=1]',
                      policy=SimpleNamespace(contended='coalesce'))


class FakeVerdicts:
    def __init__(self):
        self.revoked = []

    def revoke(self, r, reason, events):
        self.revoked.append((r.id, reason, events[0][0]))


def coalescing():
    consumer = SimpleNamespace(qos=SimpleNamespace(value=0, increment_eventually=lambda: 0),
                               timer=SimpleNamespace(cancel=lambda e: None))
    room = WaitingRoom(consumer, 0, on_expire=lambda h: None, later=lambda *a: object())
    verdicts = FakeVerdicts()
    c = Coalescing(room, SimpleNamespace(revoked=verdicts.revoke), MutexMetrics())
    return c, room, verdicts


def test_a_newer_arrival_supersedes_the_waiting_one():
    c, room, verdicts = coalescing()
    assert c.make_room(req('a'), KEY, 1)
    room.hold(req('a'), KEY, 1.0, 1)
    assert c.make_room(req('b'), KEY, 2)
    assert room.count(KEY.digest) == 0, 'the older left the room'
    (rid, reason, event), = verdicts.revoked
    assert rid == 'a' and reason.startswith('superseded by b') and event == 'mutex-superseded'
    assert c.metrics['superseded'] == 1


def test_an_older_arrival_answered_late_is_the_one_superseded():
    # a's first try was answered after b, which arrived later, already waits
    c, room, verdicts = coalescing()
    room.hold(req('b'), KEY, 1.0, 2)
    assert not c.make_room(req('a'), KEY, 1)
    assert room.first(KEY.digest).req.id == 'b'
    assert verdicts.revoked[0][:2] == ('a', 'superseded by b (mutex_contended=coalesce)')


def test_a_copy_that_waited_before_is_older_than_a_fresh_call():
    c, room, verdicts = coalescing()
    room.hold(req('fresh'), KEY, 1.0, 5)
    back = req('back', {SINCE_HEADER: time.time() - 700})
    assert not c.make_room(back, KEY, 9)
    assert verdicts.revoked[0][0] == 'back'


def test_stamp_makes_the_copy_carry_its_first_wait():
    r = req('x')
    r._mutex_waiting_since = 1234.5
    Coalescing.stamp(r)
    assert r.message.headers[SINCE_HEADER] == 1234.5


@pytest.fixture
def app():
    return Celery('t', broker='memory://', set_as_current=False)


def test_coalesce_is_an_accepted_policy(app):
    @app.task(shared=False, mutex_keys=('a',), mutex_contended='coalesce')
    def t(a):
        pass
    assert policy_for_task(t, MutexSettings.from_app({})).contended == 'coalesce'


def test_coalesce_with_a_semaphore_is_refused_naming_task_and_option(app):
    @app.task(shared=False, mutex_keys=('a',), mutex_contended='coalesce', mutex_limit=3)
    def t(a):
        pass
    settings = MutexSettings.from_app({})
    with pytest.raises(MutexConfigError) as info:
        check_combination(t, policy_for_task(t, settings), settings)
    text = str(info.value)
    assert "task 't" in text and "mutex_contended='coalesce'" in text and 'mutex_limit=3' in text


def test_a_mutex_name_shared_by_coalesce_and_requeue_tasks_is_refused(app):
    @app.task(shared=False, mutex_name='acct', mutex_keys=('a',), mutex_contended='coalesce')
    def t(a):
        pass

    @app.task(shared=False, mutex_name='acct', mutex_keys=('a',))
    def u(a):
        pass
    p = MutexPolicies(app, MutexSettings.from_app({}))
    p._policies = {x.name: policy_for_task(x, p.settings) for x in (t, u)}
    with pytest.raises(MutexConfigError) as info:
        p._check_shared_names()
    text = str(info.value)
    assert t.name in text and u.name in text and "'coalesce'" in text and "'requeue'" in text
    # the same policy on both is fine
    p._policies[u.name] = policy_for_task(t, p.settings)
    p._check_shared_names()
