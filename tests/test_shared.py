"""Shared (read) locks without services: the join's ops, what its answers mean, the
option's validation."""
from types import SimpleNamespace

import pytest
from celery import Celery
from kazoo.exceptions import (NoChildrenForEphemeralsError, NodeExistsError, NoNodeError,
                              NoAuthError, RolledBackError, RuntimeInconsistency)

from celery_mutex_bootstep.exceptions import MutexConfigError
from celery_mutex_bootstep.options import MutexSettings, policy_for_task
from celery_mutex_bootstep.policies import MutexPolicies
from celery_mutex_bootstep.shared import (FAILED, GRANTED, HELD, MARKED, PARENT_DATA,
                                          RETRY_ABSENT, RETRY_PRESENT, interpret, join_ops)


def test_a_join_checks_the_marker_then_creates_its_child_and_ticks_the_clock():
    ops = join_ops('/ns/.writer-waiting-k', '/ns/k', '/ns/k/r-1-0', b'd', True, '/ns/.clock-1')
    assert [(m, a[0]) for m, a, _ in ops] == [
        ('create', '/ns/.writer-waiting-k'), ('delete', '/ns/.writer-waiting-k'),
        ('create', '/ns/k/r-1-0'), ('set_data', '/ns/.clock-1')]
    assert ops[2][2] == {'ephemeral': True}
    absent = join_ops('/ns/m', '/ns/k', '/ns/k/r-1-0', b'd', False, None)
    # The parent is created persistent, then set once: version 1, never an exclusive
    # lease node's 0, so a reader's delete (at version 1) never removes one.
    assert [(m, a) for m, a, _ in absent[2:4]] == [('create', ('/ns/k', b'')),
                                                   ('set_data', ('/ns/k', PARENT_DATA))]
    assert absent[2][2] == {} and absent[4][2] == {'ephemeral': True}
    assert len(absent) == 5  # no clock, no token op


def failed_at(i, exc, n):
    return [RolledBackError() if j < i else exc if j == i else RuntimeInconsistency()
            for j in range(n)]


@pytest.mark.parametrize('answers, exists, meaning', [
    (['/m', None, '/k/r', object()], True, GRANTED),
    (failed_at(0, NodeExistsError(), 4), True, MARKED),
    (failed_at(2, NoChildrenForEphemeralsError(), 4), True, HELD),
    (failed_at(4, NoChildrenForEphemeralsError(), 6), False, HELD),
    (failed_at(2, NoNodeError(), 4), True, RETRY_ABSENT),
    (failed_at(2, NodeExistsError(), 6), False, RETRY_PRESENT),
    (failed_at(3, NoNodeError(), 4), True, FAILED),          # the clock node is gone
    (failed_at(2, NoAuthError(), 4), True, FAILED),
    (None, True, FAILED),
])
def test_what_a_join_answered(answers, exists, meaning):
    assert interpret(answers, exists) == meaning


@pytest.fixture
def app():
    return Celery('shared', broker='memory://', set_as_current=False)


def fn(a):
    pass


def only(*tasks):
    """Policies of just these tasks (other test modules' shared tasks join every app)."""
    return MutexPolicies(SimpleNamespace(tasks={t.name: t for t in tasks}),
                         MutexSettings.from_app({}))


def test_mutex_shared_is_a_bool_and_refused_where_it_makes_no_sense(app):
    settings = MutexSettings.from_app({})

    @app.task(shared=False, name='r', mutex_keys=('a',), mutex_shared=True)
    def r(a):
        pass
    assert policy_for_task(r, settings).shared is True

    @app.task(shared=False, name='bad', mutex_keys=('a',), mutex_shared='yes')
    def bad(a):
        pass
    with pytest.raises(MutexConfigError, match=r"task 'bad': option mutex_shared must be"):
        policy_for_task(bad, settings)
    for n, (opts, word) in enumerate((({'mutex_limit': 2}, 'mutex_limit=2'),
                                      ({'mutex_contended': 'replace'}, "'replace'"),
                                      ({'mutex_contended': 'coalesce'}, "'coalesce'"))):
        t = app.task(shared=False, name=f't{n}', mutex_keys=('a',), mutex_shared=True, **opts)(fn)
        message = f"task 't{n}': option mutex_shared=True.*{word}"
        with pytest.raises(MutexConfigError, match=message):
            only(t).validate_all()


def test_the_mutex_names_some_task_reads_are_known(app):
    policies = only(
        app.task(shared=False, name='r', mutex_name='acct', mutex_keys=('a',),
                 mutex_shared=True)(fn),
        app.task(shared=False, name='w', mutex_name='acct', mutex_keys=('a',))(fn),
        app.task(shared=False, name='x', mutex_keys=('a',))(fn))
    policies.validate_all()
    assert policies.shared_names == {'acct'}
    assert policies.get('w').shared is False and policies.get('r').shared is True


# -- the gate's wiring (no services: the fixture of test_policy_gate) -----------------

from test_policy_gate import gate, request  # noqa: E402,F401 (a fixture)


def book_keys(app):
    reader = app.task(shared=False, name='read', mutex_name='book', mutex_keys=('a',),
                      mutex_shared=True)(fn)
    writer = app.task(shared=False, name='write', mutex_name='book', mutex_keys=('a',))(fn)
    settings = MutexSettings.from_app({})
    return (policy_for_task(reader, settings).key_for((1,), {}),
            policy_for_task(writer, settings).key_for((1,), {}))


def test_readers_do_not_queue_behind_readers_asking_but_do_behind_a_writer(gate, monkeypatch):
    g, app = gate
    rkey, wkey = book_keys(app)
    assert rkey.digest == wkey.digest
    tried = []
    monkeypatch.setattr(g, '_try', lambda req, key, held, seq=0: (
        tried.append(req.id), g._in_flight.update(key.in_flight)))
    monkeypatch.setattr(g, '_watch', lambda key: None)
    monkeypatch.setattr(g.room, 'poll_revoked', lambda: None)
    monkeypatch.setattr(g, 'parked', None)  # all wait in the consumer
    reqs = [request(i) for i in 'abcd']
    for r in reqs:
        r.send_event = lambda *args, **kw: None
    g._admit(reqs[0], rkey, 1)
    g._admit(reqs[1], rkey, 2)          # a reader beside a reader asking
    g._admit(reqs[2], wkey, 3)          # a writer waits behind them
    g._admit(reqs[3], rkey, 4)          # and a later reader behind the writer
    assert tried == ['a', 'b'] and [h.req.id for h in g.room] == ['c', 'd']


def test_an_exclusive_waiter_marks_the_key_only_at_the_head_of_its_line(gate, monkeypatch):
    g, app = gate
    rkey, wkey = book_keys(app)
    g.policies.shared_names = {'book'}
    marks, unmarks = [], []
    monkeypatch.setattr(g.leases.shared, 'writer_waits', marks.append)
    monkeypatch.setattr(g.leases.shared, 'writer_done', unmarks.append)
    monkeypatch.setattr(g.leases, 'watch', lambda *args: None)
    monkeypatch.setattr(g, '_try', lambda *args: None)
    g.room.hold(request('r'), rkey, 1.0, 1, compensate=False)
    g._watch(wkey)                      # a reader heads the line: it would wait for it
    assert marks == []
    g._wake(rkey.digest, g._generation)  # the reader at the head: no marker here
    assert unmarks == [rkey.digest]
    g.room.leave(g.room.first(rkey.digest))
    g.room.hold(request('w'), wkey, 1.0, 2, compensate=False)
    g._watch(wkey)
    assert marks == [wkey.digest]
    g._watch(rkey)                      # a reader's watch never marks
    assert marks == [wkey.digest]


def test_a_sweep_restarts_a_parked_line_behind_a_dead_readers_empty_parent():
    """A parked line whose key node is a readers' parent with no readers left (their
    session expired, nobody here waits) is free: the sweep unparks it and cleans the
    parent; one with readers is held."""
    import json as _json
    from celery_mutex_bootstep.parking import ParkingLot

    class Result:
        def __init__(self, value):
            self.value = value

        def get(self, timeout=None):
            return self.value

    def stat(owner, children):
        return SimpleNamespace(ephemeralOwner=owner, numChildren=children, version=1)
    nodes = {'/ns/empty': stat(0, 0), '/ns/readers': stat(0, 2), '/ns/held': stat(7, 0)}
    client = SimpleNamespace(
        get_children_async=lambda path: Result(['empty', 'readers', 'held']),
        get_async=lambda path: Result(
            (_json.dumps({'paths': ['/ns/' + path.rsplit('/', 1)[1]]}).encode(), None)),
        exists_async=lambda path: Result(nodes[path]))
    seen = []
    leases = SimpleNamespace(client=client, connected=True, shared=SimpleNamespace(
        parent_seen=lambda path, st: seen.append(path)))
    lot = object.__new__(ParkingLot)
    unparked = []
    lot.leases, lot.root = leases, '/ns/.parked'
    lot.known = lambda: ()
    lot._measure = lambda: None
    lot._unpark = lambda digest, queue_type: unparked.append(digest)
    lot._sweep()
    assert unparked == ['empty']
    assert sorted(seen) == ['/ns/empty', '/ns/readers']
