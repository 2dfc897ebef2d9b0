"""What the test apps share: their env-driven Celery app, and the records their
tasks write (one JSON record per start and end of an execution, read back by
integration/records.py).
"""
import json
import os
import socket
import time

import redis
from celery import Celery

RECORD_URL = os.environ.get('TEST_RECORD_URL', 'redis://127.0.0.1:6379/2')

_redis = None


def _r():
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(RECORD_URL)
    return _redis


def record(records, task, phase, key, **extra):
    lease = getattr(task.request, 'mutex_lease', None) or {}
    _r().rpush(records, json.dumps(dict(
        phase=phase, task=task.name, id=task.request.id, key=key,
        t=time.time(), pid=os.getpid(), worker=task.request.hostname,
        host=socket.gethostname(), token=lease.get('token'),
        retries=task.request.retries, **extra)))


def flag_set(name):
    """A test's signal to a running task: ``name`` exists in the record store."""
    return bool(_r().exists(name))


def make_app(name, *, queue, namespace):
    """A test app configured from TEST_* variables (broker, backend, queue, ...)."""
    app = Celery(name,
                 broker=os.environ.get('TEST_BROKER', 'amqp://guest:guest@127.0.0.1:5672//'),
                 backend=os.environ.get('TEST_BACKEND', 'redis://127.0.0.1:6379/1'))
    app.conf.update(
        task_default_queue=os.environ.get('TEST_QUEUE', queue),
        mutex_namespace=os.environ.get('TEST_NAMESPACE', namespace),
        mutex_requeue_delay=float(os.environ.get('TEST_REQUEUE_DELAY', '0.2')),
        worker_prefetch_multiplier=int(os.environ.get('TEST_PREFETCH', '4')),
        mutex_park=os.environ.get('TEST_PARK', '1') == '1',
        mutex_lease_ahead=(int(os.environ['TEST_LEASE_AHEAD'])
                           if os.environ.get('TEST_LEASE_AHEAD') else None),
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        # A test can let the worker take pickled messages (non-JSON arguments).
        accept_content=os.environ.get('TEST_ACCEPT', 'json').split(','),
    )
    return app
