"""MutexTask and LockTask without a worker or a ZooKeeper: options, names, flow."""
import os
import types

import pytest
from celery import Celery, signals
from celery.exceptions import Retry
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss, NoNodeError

from celery_mutex_bootstep import migration
from celery_mutex_bootstep.exceptions import MutexConfigError, MutexKeyError
from celery_mutex_bootstep.failclosed import guard_tasks
from celery_mutex_bootstep.keys import key_digest
from celery_mutex_bootstep.migration import LockTask, MutexTask
from celery_mutex_bootstep.options import MutexSettings, policy_for_task


@pytest.fixture
def app():
    return Celery('t', broker='memory://', set_as_current=False)


def settings(**conf):
    return MutexSettings.from_app(conf)


# --------------------------------------------------------------------------- MutexTask

def test_mutex_task_guards_the_whole_task_and_drops_by_default(app):
    @app.task(base=MutexTask, shared=False)
    def t(data):
        pass
    p = policy_for_task(t, settings())
    assert p is not None and p.keys == () and p.contended == 'skip'
    assert p.key_for((1,), {}).digest == p.key_for((2,), {}).digest
    assert p.timeout == 3600.0


def test_celery_mutex_example_refines_by_a(app):
    @app.task(base=MutexTask, shared=False, mutex_timeout=30, mutex_keys=('a',))
    def my_task(a, b):
        return a + b
    p = policy_for_task(my_task, settings())
    assert p.keys == ('a',) and p.timeout == 30.0 and p.contended == 'skip'
    assert p.key_for((1, 2), {}).digest == p.key_for((1,), {'b': 3}).digest
    assert p.key_for((1, 2), {}).digest != p.key_for((2, 2), {}).digest
    assert p.name == my_task.name


def test_mutex_keys_as_a_list_like_the_old_docs(app):
    @app.task(base=MutexTask, shared=False, mutex_keys=['server_name'])
    def t(server_name, data):
        pass
    assert policy_for_task(t, settings()).keys == ('server_name',)


@pytest.mark.parametrize('options, expected', [
    ({'mutex_requeue': True}, 'requeue'),
    ({'mutex_requeue': False}, 'skip'),
    ({'mutex_contended': 'requeue'}, 'requeue'),
    ({'mutex_contended': 'skip'}, 'skip'),
    ({'mutex_contended': 'requeue', 'mutex_requeue': True}, 'requeue'),
    ({}, 'skip'),
])
def test_contended_policy_of_mutex_task(app, options, expected):
    @app.task(base=MutexTask, shared=False, mutex_keys=('a',), **options)
    def t(a):
        pass
    assert policy_for_task(t, settings()).contended == expected


def test_contradicting_options_on_one_task_are_refused(app):
    @app.task(base=MutexTask, shared=False, mutex_contended='skip', mutex_requeue=True)
    def t(a):
        pass
    with pytest.raises(MutexConfigError, match='contradicts mutex_requeue'):
        policy_for_task(t, settings())


def test_nearest_definition_wins_in_subclasses(app):
    class Waiting(MutexTask):
        mutex_requeue = True

    class Dropping(Waiting):
        mutex_contended = 'skip'

    @app.task(base=Waiting, shared=False)
    def w():
        pass

    @app.task(base=Dropping, shared=False)
    def d():
        pass

    @app.task(base=Waiting, shared=False, mutex_contended='skip')
    def d2():
        pass

    @app.task(base=Dropping, shared=False, mutex_requeue=True)
    def w2():
        pass
    assert [policy_for_task(t, settings()).contended for t in (w, d, d2, w2)] == [
        'requeue', 'skip', 'skip', 'requeue']


def test_plain_tasks_are_unchanged(app):
    @app.task(shared=False, mutex_keys=('a',))
    def requeues(a):
        pass

    @app.task(shared=False, mutex_keys=('a',), mutex_requeue=False)
    def skips(a):
        pass

    @app.task(shared=False)
    def free(a):
        pass
    assert policy_for_task(requeues, settings()).contended == 'requeue'
    assert policy_for_task(skips, settings()).contended == 'skip'
    assert policy_for_task(free, settings()) is None


def test_old_config_names_zookeeper_hosts_and_mutex_timeout(app):
    @app.task(base=MutexTask, shared=False)
    def t():
        pass

    @app.task(base=MutexTask, shared=False, mutex_timeout=5)
    def u():
        pass
    app.conf.update(ZOOKEEPER_HOSTS='zk1:2181,[::1]:2182', MUTEX_TIMEOUT=120)
    s = MutexSettings.from_app(app.conf)
    assert s.hosts == 'zk1:2181,[::1]:2182'
    assert policy_for_task(t, s).timeout == 120.0
    assert policy_for_task(u, s).timeout == 5.0, 'the task option wins'
    # the step's own names come first
    app.conf.update(mutex_hosts='zk9:2181', mutex_timeout=60)
    s = MutexSettings.from_app(app.conf)
    assert s.hosts == 'zk9:2181' and policy_for_task(t, s).timeout == 60.0


def test_app_wide_mutex_contended_does_not_change_mutex_task_default(app):
    @app.task(base=MutexTask, shared=False)
    def t():
        pass
    assert policy_for_task(t, settings(mutex_contended='requeue')).contended == 'skip'


def test_a_bad_key_name_is_refused_naming_the_task(app):
    @app.task(base=MutexTask, shared=False, mutex_keys=('acount',))
    def charge(account, amount):
        pass
    with pytest.raises(MutexConfigError, match=r"charge.*mutex_keys entry 'acount'"):
        policy_for_task(charge, settings())


def test_mutex_tasks_refuse_to_run_in_a_pool_without_the_step(app):
    @app.task(base=MutexTask, shared=False)
    def t():
        return 1

    @app.task(base=LockTask, shared=False)
    def lt():
        return 2
    app.finalize()
    guard_tasks(app)
    assert getattr(t.run, '_mutex_guarded', False)
    assert not getattr(lt.run, '_mutex_guarded', False), 'LockTask is not a step mutex'
    assert t() == 1 and t.apply().get() == 1, 'direct and eager calls still run'


# --------------------------------------------------------------------------- LockTask

@pytest.fixture
def lock_app(app):
    app.conf.update(mutex_hosts='zk1:2181', mutex_namespace='/ns')

    @app.task(base=LockTask, shared=False, bind=True)
    def job(self, ref=None):
        pass
    return app, job


def test_lock_path_is_the_hashed_task_name_and_refinements(lock_app):
    app, job = lock_app
    for refs in [(), ('a/b',), ('ü', 7), ({'x': [1, 2.0]},)]:
        digest = key_digest(job.name, list(refs))
        assert job.lock_path(*refs) == f'/ns/locks/lock-{digest}'
        assert job.lock_path(*refs, kind='semaphore') == f'/ns/locks/semaphore-{digest}'
    assert job.lock_path('a', 'b') != job.lock_path('a/b') != job.lock_path('ab')
    assert job.lock_path(1) == job.lock_path(1.0)
    with pytest.raises(MutexKeyError, match='canonical JSON'):
        job.lock_path(b'bytes')


class FakeRecipe:
    def __init__(self):
        self.released = 0

    def release(self):
        self.released += 1
        return True


@pytest.fixture
def fake_zk(monkeypatch, lock_app):
    """Replace the session and the acquire: record the calls, choose the answer."""
    app, job = lock_app
    calls = []
    state = {'acquired': True, 'recipe': FakeRecipe()}
    session = migration.LockSession(migration.lock_settings(app))
    monkeypatch.setattr(migration, 'lock_session', lambda a: session)

    def acquire(sess, kind, path, identifier, max_leases, blocking, wait, task):
        calls.append(dict(kind=kind, path=path, identifier=identifier,
                          max_leases=max_leases, blocking=blocking, wait=wait))
        return state['recipe'], state['acquired']
    monkeypatch.setattr(migration, '_acquire', acquire)
    return types.SimpleNamespace(app=app, job=job, calls=calls, state=state, session=session)


def test_lock_is_non_blocking_by_default_and_released_on_exit(fake_zk):
    z = fake_zk
    with z.job.lock('r') as acquired:
        assert acquired is True
        assert z.session._held == 1
    assert z.calls == [dict(kind='lock', path=z.job.lock_path('r'), identifier=z.calls[0]
                            ['identifier'], max_leases=1, blocking=False, wait=None)]
    assert z.state['recipe'].released == 1 and z.session._held == 0
    assert '"task":"%s"' % z.job.name in z.calls[0]['identifier']


def test_lock_released_when_the_body_raises(fake_zk):
    z = fake_zk
    with pytest.raises(KeyError):
        with z.job.lock('r'):
            raise KeyError('x')
    assert z.state['recipe'].released == 1


def test_not_acquired_yields_false_and_releases_nothing(fake_zk):
    z = fake_zk
    z.state['acquired'] = False
    with z.job.lock('r') as acquired:
        assert acquired is False
    assert z.state['recipe'].released == 0


def test_retry_true_calls_task_retry_with_the_rest_of_the_arguments(fake_zk, monkeypatch):
    z = fake_zk
    z.state['acquired'] = False
    seen = {}

    def retry(**kwargs):
        seen.update(kwargs)
        raise Retry('retrying')
    monkeypatch.setattr(z.job, 'retry', retry)
    body = []
    with pytest.raises(Retry):
        with z.job.lock('r', retry=True, countdown=10, max_retries=1, timeout=3):
            body.append(1)
    assert body == [] and seen == {'countdown': 10, 'max_retries': 1}


def test_blocking_forces_retry_off_and_waits_with_timeout(fake_zk, monkeypatch):
    z = fake_zk
    monkeypatch.setattr(z.job, 'retry', lambda **kw: pytest.fail('retried'))
    z.state['acquired'] = False  # the wait ran out
    with z.job.lock('r', blocking=True, retry=True, timeout=2.5) as acquired:
        assert acquired is False
    assert z.calls[-1]['blocking'] is True and z.calls[-1]['wait'] == 2.5
    with z.job.lock('r', blocking=True):
        pass
    assert z.calls[-1]['wait'] is None


def test_semaphore_passes_max_leases_and_checks_it(fake_zk):
    z = fake_zk
    with z.job.semaphore('s', max_leases=3) as acquired:
        assert acquired
    assert z.calls[-1]['kind'] == 'semaphore' and z.calls[-1]['max_leases'] == 3
    assert z.calls[-1]['path'] == z.job.lock_path('s', kind='semaphore')
    for bad in (0, -1, 1.5, True, '2'):
        with pytest.raises(ValueError, match='max_leases'):
            z.job.semaphore('s', max_leases=bad)


def test_store_values_false_keeps_refinements_out_of_the_node(fake_zk):
    z = fake_zk
    z.app.conf.mutex_store_values = False
    z.session.settings = migration.lock_settings(z.app)
    with z.job.lock('secret'):
        pass
    assert 'secret' not in z.calls[-1]['identifier']


# --------------------------------------------------------------------------- sessions

@pytest.fixture
def no_sessions(monkeypatch):
    monkeypatch.setattr(migration, '_sessions', {})
    monkeypatch.setattr(migration, '_sessions_pid', None)
    monkeypatch.setattr(migration, '_inherited', [])


def test_one_session_per_process_never_reused_after_fork(lock_app, no_sessions, monkeypatch):
    app, job = lock_app
    first = migration.lock_session(app)
    assert migration.lock_session(app) is first
    assert first.client is None, 'lazily: nothing connects before the first lock'
    parent = os.getpid()
    monkeypatch.setattr(migration.os, 'getpid', lambda: parent + 100000)
    child = migration.lock_session(app)
    assert child is not first and child.pid == parent + 100000
    assert migration._inherited == [first], 'kept, never closed or used by the child'
    with pytest.raises(RuntimeError, match='not created in'):
        first.start()


def test_sessions_follow_the_connection_settings(lock_app, no_sessions):
    app, job = lock_app
    a = migration.lock_session(app)
    app.conf.mutex_hosts = 'zk2:2181'
    b = migration.lock_session(app)
    assert a is not b and b.settings.hosts == 'zk2:2181'
    app.conf.mutex_namespace = '/other'
    assert migration.lock_session(app) is b, 'the namespace is not a connection setting'


def test_worker_flags_reach_the_lock_settings(lock_app):
    app, job = lock_app
    worker = types.SimpleNamespace(app=app)
    signals.celeryd_init.send(sender='w@h', instance=worker, conf=app.conf, options={
        'mutex_hosts': 'flag:2181', 'mutex_session_timeout': 4.0, 'mutex_auth': None,
        'concurrency': 2})
    s = migration.lock_settings(app)
    assert s.hosts == 'flag:2181' and s.session_timeout == 4.0
    assert migration.lock_settings(Celery('other', set_as_current=False)).hosts == \
        'localhost:2181'


# --------------------------------------------------------------------------- leftovers

def test_failed_cleanup_and_release_are_remembered():
    client = KazooClient(hosts='127.0.0.1:1')  # never started: not connected
    orphans = migration._Orphans()
    lock = migration._Lock(client, '/ns/locks/lock-x', 'id', orphans)
    lock._best_effort_cleanup()  # nothing was created: nothing owed
    assert orphans.snapshot() == []
    lock.create_tried = True
    lock._best_effort_cleanup()
    assert orphans.snapshot() == [('/ns/locks/lock-x', lock.prefix)]
    orphans.clear()
    lock.is_acquired, lock.node = True, lock.prefix + '0000000001'
    assert lock.release() is False and lock.is_acquired is False
    assert orphans.snapshot() == [('/ns/locks/lock-x', lock.prefix)]

    sem = migration._Semaphore(client, '/ns/locks/semaphore-x', 'id', 2, orphans)
    orphans.clear()
    sem._best_effort_cleanup()
    sem.is_acquired = True
    assert sem.release() is False
    name = sem.create_path.rsplit('/', 1)[1]
    assert orphans.snapshot() == [('/ns/locks/semaphore-x', name)]


def test_non_blocking_acquire_fails_fast_while_disconnected():
    client = KazooClient(hosts='127.0.0.1:1')
    orphans = migration._Orphans()
    lock = migration._Lock(client, '/ns/locks/lock-x', 'id', orphans, give_up_after=0.3)
    with pytest.raises(migration.ZooKeeperUnavailable):
        lock.acquire(blocking=False)
    assert orphans.snapshot() == [], 'no request was sent, nothing is owed'


class FakeClient:
    connected = True

    def __init__(self, children, fail=None):
        self.children = children
        self.deleted = []
        self.fail = fail

    def get_children(self, path):
        if self.fail:
            raise self.fail
        if path not in self.children:
            raise NoNodeError()
        return list(self.children[path])

    def delete(self, path):
        self.deleted.append(path)


def test_sweep_deletes_only_the_remembered_nodes():
    session = migration.LockSession(settings())
    session.client = FakeClient({'/l/lock-a': ['p1__lock__0000000003', 'p2__lock__0000000004'],
                                 '/l/semaphore-b': ['u1', 'u2']})
    session.orphans.add('/l/lock-a', 'p1__lock__')
    session.orphans.add('/l/semaphore-b', 'u2')
    session.orphans.add('/l/gone', 'p3')
    session.sweep()
    assert sorted(session.client.deleted) == ['/l/lock-a/p1__lock__0000000003',
                                              '/l/semaphore-b/u2']
    assert len(session.orphans) == 0


def test_sweep_keeps_what_it_could_not_check():
    session = migration.LockSession(settings())
    session.client = FakeClient({}, fail=ConnectionLoss())
    session.orphans.add('/l/lock-a', 'p1')
    session.sweep()
    assert session.orphans.snapshot() == [('/l/lock-a', 'p1')]


def test_session_loss_forgets_what_is_owed():
    session = migration.LockSession(settings())
    session.orphans.add('/l/lock-a', 'p1')
    session._on_state('LOST')
    assert len(session.orphans) == 0
