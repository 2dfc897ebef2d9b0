"""install(app) adds the step and its flags, once."""
from celery import Celery

from celery_mutex_bootstep import MutexStep, install


def flags(app):
    return sorted(o for p in app.user_options['worker'] for o in p.opts)


def test_install_is_idempotent():
    app = Celery('t', broker='memory://', set_as_current=False)
    assert install(app) is app
    install(app)
    assert MutexStep in app.steps['consumer']
    assert flags(app) == ['--mutex-auth', '--mutex-hosts', '--mutex-on-session-loss',
                          '--mutex-session-timeout', '--without-mutex']


def test_step_alone_adds_no_flags():
    app = Celery('t', broker='memory://', set_as_current=False)
    app.steps['consumer'].add(MutexStep)
    assert flags(app) == []
