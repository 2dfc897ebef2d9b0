"""What a lease node stores: who holds it, so operators can see and judge it."""
from __future__ import annotations

import json
import os
import socket
import time
from functools import lru_cache
from typing import Any, Optional

from .keys import KEY_FORMAT
from .options import MutexKey

__all__ = ('lease_data', 'parse_lease_data')

_HOST = socket.gethostname()
_VALUE_CHARS = 200  # per value: enough to recognise it, bounded node size


def _short(value: Any) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS] + '...'


_dumps = json.JSONEncoder(separators=(',', ':')).encode


@lru_cache(maxsize=1024)
def _fixed_part(policy: Any, task: str, hostname: Optional[str], pid: int) -> str:
    # What does not change between requests of one task, encoded once.
    fixed = {
        'v': KEY_FORMAT, 'mutex': policy.name, 'task': task, 'host': _HOST,
        'pid': pid, 'worker': hostname, 'timeout': policy.timeout,
        'keys': list(policy.keys),
    }
    contended = getattr(policy, 'contended', 'requeue')
    if contended != 'requeue':  # for `celery mutex list`; the default is not repeated
        fixed['contended'] = contended
    if getattr(policy, 'shared', False):  # a reader: `celery mutex list` says so
        fixed['shared'] = True
    return _dumps(fixed)[:-1]


def lease_data(req: Any, key: MutexKey, *, hostname: Optional[str] = None,
               store_values: bool = True) -> bytes:
    """JSON naming the holder: host, pid, worker, task id, acquired-at, timeout."""
    text = (_fixed_part(key.policy, req.type, hostname, os.getpid())
            + ',"task_id":' + _dumps(req.id)
            + ',"acquired_at":' + repr(round(time.time(), 3)))
    if store_values and key.values:
        text += ',"values":' + _dumps([_short(v) for v in key.values])
    return (text + '}').encode('utf-8')


def parse_lease_data(raw: bytes) -> dict:
    """Decode a lease node's data; unknown or damaged data gives ``{}``."""
    try:
        data = json.loads(raw.decode('utf-8'))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}
