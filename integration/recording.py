"""What test tasks write: one JSON record per start and end of an execution.

Used by the test apps' tasks (in the pool processes); integration/records.py
reads the records back.
"""
import json
import os
import socket
import time

import redis

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
