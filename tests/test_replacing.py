"""mutex_contended='replace': refused where a holder cannot be stopped, or with a
semaphore; which holder a call stops (older by grant than the call's arrival)."""
import time
from types import SimpleNamespace

import pytest
from celery import Celery

from celery_mutex_bootstep.exceptions import MutexConfigError
from celery_mutex_bootstep.metrics import MutexMetrics
from celery_mutex_bootstep.options import MutexSettings, policy_for_task
from celery_mutex_bootstep.policies import MutexPolicies, check_combination
from celery_mutex_bootstep.replacing import Replacing


@pytest.fixture
def app():
    return Celery('t', broker='memory://', set_as_current=False)


def consumer_on(pool_module):
    pool_cls = type('Pool', (), {'__module__': pool_module})
    return SimpleNamespace(controller=SimpleNamespace(pool_cls=pool_cls), pool=None)


def test_replace_on_a_pool_that_cannot_stop_a_holder_is_refused_naming_task_and_option(app):
    @app.task(shared=False, mutex_keys=('a',), mutex_contended='replace')
    def t(a):
        pass
    for loss in ('kill', 'continue'):  # even where losing exclusivity is accepted
        p = MutexPolicies(app, MutexSettings.from_app({'mutex_on_session_loss': loss}))
        p._policies = {t.name: policy_for_task(t, p.settings)}
        for pool in ('celery.concurrency.thread', 'celery.concurrency.solo'):
            with pytest.raises(MutexConfigError) as info:
                p.validate_pool(consumer_on(pool))
            text = str(info.value)
            assert t.name in text and "mutex_contended='replace'" in text, text
        p.validate_pool(consumer_on('celery.concurrency.prefork'))


def test_replace_with_a_semaphore_is_refused(app):
    @app.task(shared=False, mutex_keys=('a',), mutex_contended='replace', mutex_limit=2)
    def t(a):
        pass
    settings = MutexSettings.from_app({})
    with pytest.raises(MutexConfigError, match="mutex_contended='replace'.*mutex_limit=2"):
        check_combination(t, policy_for_task(t, settings), settings)


class Lease:
    def __init__(self, key, acquired_at):
        self.key, self.acquired_at, self.released, self.path = key, acquired_at, False, '/p'


class Holders:
    def __init__(self, granted):
        self._granted = dict(granted)
        self.killed = []

    def _kill(self, req, lease):
        self.killed.append(req.id)

    def release_matching(self, task_id):
        return [{'task_id': task_id, 'action': 'killed when it starts'}]


class Req(SimpleNamespace):
    __hash__ = object.__hash__


class Verdicts:
    def __init__(self):
        self.revoked = []

    def revoked_(self, req, reason, events):
        self.revoked.append((req.id, reason))


def replacing(granted):
    verdicts = Verdicts()
    holders = Holders(granted)
    r = Replacing(SimpleNamespace(hostname='w1'), SimpleNamespace(), holders,
                  SimpleNamespace(revoked=verdicts.revoked_), lambda *a: None, MutexMetrics())
    return r, holders, verdicts


KEY = SimpleNamespace(digest='k' * 64, describe=lambda: 't[a=1]')


def test_a_call_stops_a_local_holder_granted_before_it_arrived_once():
    old = Req(id='old', name='t', time_start=1.0)
    r, holders, verdicts = replacing({Lease(KEY.digest, time.time() - 5): old})
    new = Req(id='new', name='t')
    r.contended(new, KEY)
    r.contended(new, KEY)  # woken and contended again: asked once
    assert holders.killed == ['old']
    assert verdicts.revoked == [('old', 'replaced by new (mutex_contended=replace)')]
    assert r.metrics['replaced'] == 1


def test_a_holder_granted_after_the_call_arrived_is_not_stopped():
    new = Req(id='new', name='t')
    new._mutex_arrived = time.time() - 5
    later = Req(id='later', name='t', time_start=1.0)
    r, holders, verdicts = replacing({Lease(KEY.digest, time.time()): later})
    r.contended(new, KEY)
    assert holders.killed == [] and verdicts.revoked == []


def test_a_holder_of_another_key_is_left_alone():
    other = Req(id='other', name='t', time_start=1.0)
    r, holders, _ = replacing({Lease('x' * 64, time.time() - 5): other})
    r.leases = SimpleNamespace(client=SimpleNamespace(
        get_async=lambda path: (_ for _ in ()).throw(RuntimeError('no session'))),
        path_for=lambda d: '/ns/' + d)
    r.contended(Req(id='new', name='t'), KEY)
    assert holders.killed == []


def test_a_holder_on_another_worker_is_asked_to_stop_through_mutex_release_off_the_consumer():
    import json
    sent, calls = [], []
    data = json.dumps({'task_id': 'old', 'worker': 'w2@h', 'acquired_at': time.time() - 5})

    class Result:
        def rawlink(self, callback):
            callback(self)

        def get(self, block=True):
            return data.encode(), None
    app = SimpleNamespace(control=SimpleNamespace(
        broadcast=lambda command, **kw: sent.append((command, kw))))
    r = Replacing(SimpleNamespace(hostname='w1@h', app=app),
                  SimpleNamespace(client=SimpleNamespace(get_async=lambda path: Result()),
                                  path_for=lambda d: '/ns/' + d),
                  Holders({}), SimpleNamespace(call=calls.append),
                  lambda fun, *args: fun(*args), MutexMetrics())
    new = Req(id='new', name='t', send_event=lambda *a, **k: None)
    r.contended(new, KEY)
    r.contended(new, KEY)
    assert sent == [] and len(calls) == 1, 'not on the consumer thread, and asked once'
    calls[0]()
    assert sent == [('mutex_release', {'destination': ['w2@h'], 'arguments': {
        'task_id': 'old', 'replaced_by': 'new'}})]


def test_the_lease_node_and_celery_mutex_list_name_a_policy_other_than_requeue(app):
    import json

    from celery_mutex_bootstep.command.listing import _task
    from celery_mutex_bootstep.payload import lease_data

    @app.task(shared=False, mutex_keys=('a',), mutex_contended='replace')
    def t(a):
        pass

    @app.task(shared=False, mutex_keys=('a',))
    def u(a):
        pass
    settings = MutexSettings.from_app({})
    for task, expected in ((t, 'replace'), (u, None)):
        policy = policy_for_task(task, settings)
        req = SimpleNamespace(type=task.name, id='id-1')
        data = json.loads(lease_data(req, policy.key_for((1,), {})))
        assert data.get('contended') == expected
        node = SimpleNamespace(data=data, task=task.name)
        assert _task(node) == (f'{task.name} (replace)' if expected else task.name)
