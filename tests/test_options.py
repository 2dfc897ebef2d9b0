"""Option parsing and validation, on real Celery task objects (no worker)."""
import pytest
from celery import Celery

from celery_mutex_bootstep.exceptions import MutexConfigError, MutexKeyError
from celery_mutex_bootstep.options import MutexSettings, policy_for_task, validate_hosts


@pytest.fixture
def app():
    return Celery('t', broker='memory://', set_as_current=False)


def settings(**conf):
    return MutexSettings.from_app(conf)


def test_unguarded_task_has_no_policy(app):
    @app.task
    def t(a):
        pass
    assert policy_for_task(t, settings()) is None


def test_mutex_true_and_empty_keys_guard_the_whole_task(app):
    @app.task(mutex=True)
    def t(a):
        pass

    @app.task(mutex_keys=())
    def u(a):
        pass
    for task in (t, u):
        p = policy_for_task(task, settings())
        assert p.keys == () and p.key_for((1,), {}).digest == p.key_for((2,), {}).digest


def test_binding_applies_defaults_and_keywords(app):
    @app.task(mutex_keys=('a', 'b'))
    def t(a, b=2, c=3):
        pass
    p = policy_for_task(t, settings())
    k = p.key_for((1,), {'b': 2}).digest
    assert p.key_for((), {'a': 1, 'b': 2}).digest == k
    assert p.key_for((1,), {}).digest == k
    assert p.key_for((1, 2, 99), {}).digest == k
    assert p.key_for((1, 3), {}).digest != k


def test_bound_task_ignores_self(app):
    @app.task(bind=True, mutex_keys=('a',))
    def t(self, a):
        pass
    p = policy_for_task(t, settings())
    assert p.key_for((5,), {}).values == (5,)


def test_arguments_that_do_not_bind_name_the_task(app):
    @app.task(mutex_keys=('a',))
    def t(a):
        pass
    p = policy_for_task(t, settings())
    with pytest.raises(MutexKeyError, match=r"task '.*\.t': arguments do not match"):
        p.key_for((1, 2), {})


def test_mutex_name_shares_a_mutex(app):
    @app.task(mutex_name='billing', mutex_keys=('account',))
    def a(account, amount):
        pass

    @app.task(mutex_name='billing', mutex_keys=('acct',))
    def b(acct):
        pass
    pa, pb = policy_for_task(a, settings()), policy_for_task(b, settings())
    assert pa.key_for((7, 1), {}).digest == pb.key_for((7,), {}).digest


@pytest.mark.parametrize('opts,message', [
    (dict(mutex_keys=('nope',)), "option mutex_keys entry 'nope' is not a parameter of the function (parameters: a, b)"),
    (dict(mutex_keys='a'), "option mutex_keys must be a tuple of parameter names, got 'a' (for one name write ('a',))"),
    (dict(mutex_keys=('a', 'a')), 'names a parameter twice'),
    (dict(mutex_keys=('args',)), "entry 'args' is not a parameter"),
    (dict(mutex=True, mutex_timeout=-1), 'option mutex_timeout must be > 0'),
    (dict(mutex=True, mutex_timeout='soon'), 'option mutex_timeout must be a number of seconds'),
    (dict(mutex=True, mutex_timeout=True), 'option mutex_timeout must be a number of seconds'),
    (dict(mutex=True, mutex_requeue_delay=-0.5), 'option mutex_requeue_delay must be > 0'),
    (dict(mutex=True, mutex_requeue_delay=0), 'option mutex_requeue_delay must be > 0'),
    (dict(mutex=True, mutex_name=''), 'option mutex_name must be a non-empty string'),
    (dict(mutex='yes'), 'option mutex must be True or False'),
])
def test_mistakes_name_task_and_option(app, opts, message):
    @app.task(**opts)
    def t(a, b=1, *args, **kwargs):
        pass
    with pytest.raises(MutexConfigError) as info:
        policy_for_task(t, settings())
    assert message in str(info.value)
    assert "task 'test_options.t'" in str(info.value) or '.t' in str(info.value)


def test_timeout_defaults(app):
    @app.task(mutex=True)
    def t():
        pass

    @app.task(mutex=True, mutex_timeout=30)
    def u():
        pass
    assert policy_for_task(t, settings()).timeout == 3600
    assert policy_for_task(t, settings(MUTEX_TIMEOUT=60)).timeout == 60
    assert policy_for_task(t, settings(MUTEX_TIMEOUT=60, mutex_timeout='90')).timeout == 90
    assert policy_for_task(u, settings(mutex_timeout=90)).timeout == 30
    assert policy_for_task(t, settings()).requeue_delay == 1.0
    assert policy_for_task(t, settings(mutex_requeue_delay=0.25)).requeue_delay == 0.25


def test_hosts_first_found_wins():
    assert MutexSettings.from_app({}).hosts == 'localhost:2181'
    assert MutexSettings.from_app({'ZOOKEEPER_HOSTS': 'zk:1'}).hosts == 'zk:1'
    assert MutexSettings.from_app({'ZOOKEEPER_HOSTS': 'zk:1', 'mutex_hosts': 'zk:2'}).hosts == 'zk:2'
    assert MutexSettings.from_app({'mutex_hosts': 'zk:2'}, hosts='zk:3').hosts == 'zk:3'


@pytest.mark.parametrize('hosts', [
    'localhost:2181', 'a:1,b:2,c:3', 'zk1:2181,zk2:2181/apps/billing', '[::1]:2181',
    '[2001:db8::1]:2181,10.0.0.1:2181', 'zk', ' zk:2181 ',
])
def test_valid_hosts(hosts):
    assert validate_hosts(hosts) == hosts.strip()


@pytest.mark.parametrize('hosts,part', [
    ('', "expected"), ('zk:abc', "bad port 'abc'"), ('zk:70000', "bad port '70000'"),
    ('zk:2181,,zk2:2181', 'empty host'), ('::1:2181', 'several colons'),
    ('[::zz]:2181', 'not a bracketed IPv6'), ('zk:2181/', 'chroot'),
    ('zk:2181/a//b', 'invalid znode path'), ('zk:', 'missing port'),
])
def test_malformed_hosts_name_the_flag_and_part(hosts, part):
    with pytest.raises(MutexConfigError) as info:
        validate_hosts(hosts)
    assert str(info.value).startswith('--mutex-hosts') and part in str(info.value)


@pytest.mark.parametrize('conf,message', [
    ({'mutex_namespace': 'relative'}, 'mutex_namespace must be an absolute znode path'),
    ({'mutex_namespace': '/zookeeper/x'}, 'reserved'),
    ({'mutex_timeout': 0}, 'app config mutex_timeout must be > 0'),
    ({'mutex_hosts': 'zk:x'}, "mutex_hosts: bad port 'x'"),
    ({'mutex_max_held': -1}, 'mutex_max_held must be >= 0'),
    ({'mutex_lease_ahead': -1}, 'app config mutex_lease_ahead must be >= 0'),
    ({'mutex_lease_ahead': 'two'}, 'app config mutex_lease_ahead must be an integer'),
])
def test_app_config_mistakes(conf, message):
    with pytest.raises(MutexConfigError) as info:
        MutexSettings.from_app(conf)
    assert message in str(info.value)


def checked(app, *tasks):
    # Only these tasks: other tests' shared tasks land in every app.
    from celery_mutex_bootstep.gate import MutexPolicies
    policies = MutexPolicies(app, settings())
    policies._policies = {t.name: policy_for_task(t, settings()) for t in tasks}
    policies._check_shared_names()


def test_tasks_sharing_a_mutex_name_with_different_limits_are_refused(app):
    @app.task(shared=False, name='proj.exclusive', mutex_name='acct', mutex_keys=('a',))
    def exclusive(a):
        pass

    @app.task(shared=False, name='proj.shared', mutex_name='acct', mutex_keys=('a',), mutex_limit=2)
    def shared(a):
        pass
    with pytest.raises(MutexConfigError) as e:
        checked(app, exclusive, shared)
    msg = str(e.value)
    assert "'proj.exclusive'" in msg and "'proj.shared'" in msg and 'mutex_limit' in msg


def test_tasks_sharing_a_mutex_name_with_one_limit_are_accepted(app):
    @app.task(shared=False, name='proj.a', mutex_name='acct', mutex_keys=('a',), mutex_limit=2)
    def a(a):
        pass

    @app.task(shared=False, name='proj.b', mutex_name='acct', mutex_keys=('a',), mutex_limit=2)
    def b(a):
        pass
    checked(app, a, b)


def test_app_wide_requeue_delay_of_zero_is_refused():
    with pytest.raises(MutexConfigError, match='app config mutex_requeue_delay must be > 0'):
        settings(mutex_requeue_delay=0)
