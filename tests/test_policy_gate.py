"""The gate's wiring of the policies (no services: nothing starts): a coalesced
waiter kept too long goes back as a copy that stays the older; an arrival whose
earlier call is still asking ZooKeeper waits behind it and supersedes it only
by arrival order."""
import time
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.concurrency.prefork import TaskPool

from celery_mutex_bootstep import MutexStep
from celery_mutex_bootstep import gate as gate_module
from celery_mutex_bootstep.lease import ZooKeeperLeases
from celery_mutex_bootstep.options import MutexSettings, policy_for_task
from celery_mutex_bootstep.outcome import LeaseOutcome
from celery_mutex_bootstep.waiting import SINCE_HEADER


@pytest.fixture
def gate(monkeypatch):
    from celery_mutex_bootstep.gate import MutexPolicies
    monkeypatch.setattr(MutexPolicies, 'validate_all', lambda self: None)
    monkeypatch.setattr(ZooKeeperLeases, 'connected', property(lambda self: True))
    app = Celery('policy-gate', broker='memory://', set_as_current=False)
    c = SimpleNamespace(
        app=app, hostname='w@h', hub=None, pool=None, timer=SimpleNamespace(
            cancel=lambda entry: None, call_after=lambda *args: object()),
        qos=SimpleNamespace(value=0, increment_eventually=lambda: 0,
                            decrement_eventually=lambda n: None), connection_errors=(),
        controller=SimpleNamespace(pool_cls=TaskPool), on_task_request=lambda req: None,
        call_soon=lambda fun, *args: None)
    step = MutexStep(c, mutex_hosts='127.0.0.1:2181')
    yield step.gate, app
    step.inbox.close()
    step.leases.deadline.validity.close()


class Req(SimpleNamespace):
    __hash__ = object.__hash__


def request(id):
    return Req(id=id, name='t', message=SimpleNamespace(headers={}), revoked=lambda: False,
               expires=None, acknowledged=False)


def coalesced_key(app):
    @app.task(shared=False, name='t', mutex_keys=('a',), mutex_contended='coalesce')
    def t(a):
        pass
    return policy_for_task(t, MutexSettings.from_app({})).key_for((1,), {})


def test_a_coalesced_waiter_kept_too_long_goes_back_carrying_its_first_wait(gate, monkeypatch):
    g, app = gate
    key = coalesced_key(app)
    republished = []
    monkeypatch.setattr(g.holders, 'republish', republished.append)
    monkeypatch.setattr(gate_module, '_ROOM_WAIT_MAX', 0.0)
    req = request('old')
    held = g.room.hold(req, key, 1.0, 1, compensate=False)
    g._expired(held)
    assert republished == [req] and len(g.room) == 0
    since = req.message.headers[SINCE_HEADER]
    assert abs(since - held.waiting_since) < 1e-6 and since <= time.time()


def test_a_coalesced_waiter_stays_while_its_time_is_not_up(gate, monkeypatch):
    g, app = gate
    key = coalesced_key(app)
    monkeypatch.setattr(g.holders, 'republish', lambda req: pytest.fail('republished'))
    monkeypatch.setattr(g, '_watch', lambda key: None)
    held = g.room.hold(request('w'), key, 1.0, 1, compensate=False)
    g._expired(held)
    assert g.room.first(key.digest) is held


def test_an_earlier_arrival_answered_late_is_superseded_by_the_later_one_waiting(
        gate, monkeypatch):
    g, app = gate
    key = coalesced_key(app)
    revoked = []
    monkeypatch.setattr(g.verdicts, 'revoked', lambda req, reason, events: revoked.append(
        (req.id, reason)))
    monkeypatch.setattr(g, '_watch', lambda key: None)
    monkeypatch.setattr(g.room, 'poll_revoked', lambda: None)
    a, b = request('a'), request('b')
    a.send_event = b.send_event = lambda *args, **kw: None
    tried = []
    monkeypatch.setattr(g, '_try', lambda req, key, held, seq=0: (
        tried.append(req.id), g._in_flight.update({key.digest: 1})))
    g._admit(a, key, 1)                  # asks ZooKeeper
    g._admit(b, key, 2)                  # waits behind it without asking
    assert tried == ['a'] and g.room.first(key.digest).req is b
    g._answered(a, key, None, g._generation, LeaseOutcome.CONTENDED, None, None, 1)
    assert revoked == [('a', 'superseded by b (mutex_contended=coalesce)')]
    assert g.room.first(key.digest).req is b
