"""celery-mutex-bootstep: ZooKeeper mutexes for Celery tasks, enforced in the consumer.

    from celery_mutex_bootstep import install
    install(app)                      # adds MutexStep and --mutex-hosts

    @app.task(mutex_keys=('account',), mutex_timeout=30)
    def charge(account, amount): ...
"""
from .cli import install
from .exceptions import MutexConfigError, MutexContended, MutexKeyError, MutexTimeout
from .lease_info import mutex_lease
from .migration import LockTask, MutexTask
from .step import MutexStep

__all__ = ('MutexStep', 'install', 'MutexTask', 'LockTask', 'mutex_lease',
           'MutexConfigError', 'MutexContended', 'MutexKeyError', 'MutexTimeout')
__version__ = '0.1.0'
