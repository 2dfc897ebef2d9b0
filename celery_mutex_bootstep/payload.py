"""What a lease node stores: who holds it, so operators can see and judge it."""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Optional

from .keys import KEY_FORMAT
from .options import MutexKey

__all__ = ('lease_data', 'parse_lease_data')

_HOST = socket.gethostname()
_VALUE_CHARS = 200  # per value: enough to recognise it, bounded node size


def _short(value: Any) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS] + '...'


def lease_data(req: Any, key: MutexKey, *, hostname: Optional[str] = None,
               store_values: bool = True) -> bytes:
    """JSON naming the holder: host, pid, worker, task id, acquired-at, timeout."""
    policy = key.policy
    data = {
        'v': KEY_FORMAT,
        'mutex': policy.name,
        'task': req.type,
        'task_id': req.id,
        'host': _HOST,
        'pid': os.getpid(),
        'worker': hostname,
        'acquired_at': round(time.time(), 3),
        'timeout': policy.timeout,
        'keys': list(policy.keys),
    }
    if store_values:
        data['values'] = [_short(v) for v in key.values]
    return json.dumps(data, separators=(',', ':')).encode('utf-8')


def parse_lease_data(raw: bytes) -> dict:
    """Decode a lease node's data; unknown or damaged data gives ``{}``."""
    try:
        data = json.loads(raw.decode('utf-8'))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return {}
    return data if isinstance(data, dict) else {}
