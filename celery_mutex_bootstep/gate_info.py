"""What ``celery inspect mutex_leases`` shows of one worker's gate."""
from __future__ import annotations

import time
from typing import Any, Dict

__all__ = ('gate_info',)


def gate_info(gate: Any) -> Dict[str, Any]:
    """The session, what waits (here and parked), the leases held, the counters."""
    return {
        'session': 'connected' if gate.leases.connected else 'disconnected',
        'session_id': gate.leases.session_id,
        'waiting_for_a_process': len(gate.places.line),
        'waiting': [{'task_id': h.req.id, 'task': h.req.name, 'key': h.key.digest,
                     'waited': round(time.monotonic() - h.since, 3),
                     'contended': h.key.policy.contended,
                     'wait_timeout': h.key.policy.wait_timeout} for h in gate.room],
        'leases': [
            {'key': lease.key, 'path': lease.path, 'token': lease.token,
             'session_id': lease.session_id, 'task_id': lease.owner,
             'task': getattr(gate.holders.request_of(lease), 'name', None),
             'age': round(time.monotonic() - lease.acquired_monotonic, 3)}
            for lease in gate.leases.held()
        ],
        **(gate.parked.info() if gate.parked is not None else {}),
        **gate.room.summary(gate.parked),
        **gate.metrics.snapshot(),
        'zookeeper_ops': dict(gate.leases.stats),
    }
