"""How MutexStep wires the session to the consumer thread (no services: nothing starts)."""
from types import SimpleNamespace

from celery import Celery
from celery.concurrency.prefork import TaskPool

from celery_mutex_bootstep import MutexStep


def consumer():
    app = Celery('wiring', broker='memory://', set_as_current=False)
    scheduled = []
    c = SimpleNamespace(
        app=app, hostname='w@h', hub=None, pool=None, timer=None, qos=None,
        controller=SimpleNamespace(pool_cls=TaskPool),
        on_task_request=lambda req: None,
        call_soon=lambda fun, *args: scheduled.append(fun))
    return c, scheduled


def test_session_states_queue_behind_the_answers_sent_before_them(monkeypatch):
    """kazoo reports CONNECTED after an answer it already handed over: the gate must
    see the answer first (a waiter still 'trying' would otherwise miss its retry)."""
    # Other test modules' shared tasks (some deliberately misconfigured) land in
    # every app: this test is about the wiring, not their options.
    from celery_mutex_bootstep.gate import MutexPolicies
    monkeypatch.setattr(MutexPolicies, 'validate_all', lambda self: None)
    c, _ = consumer()
    step = MutexStep(c, mutex_hosts='127.0.0.1:2181')
    try:
        seen = []
        step.gate.on_session = lambda state: seen.append(('state', state))
        step.inbox.post(seen.append, ('answer', 1))
        step.leases.on_state('connected')
        step.inbox.drain()
        assert seen == [('answer', 1), ('state', 'connected')]
    finally:
        step.inbox.close()
        step.leases.deadline.validity.close()
