"""Remote control: ``celery inspect mutex_leases`` asks each worker for its view."""
from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

__all__ = ('mutex_leases',)


@inspect_command()
def mutex_leases(state: Any) -> dict:
    """This worker's leases (with task ids), waiting messages, session and counters."""
    gate = getattr(state.consumer, 'mutex_gate', None)
    if gate is None:
        return {'error': 'MutexStep is not running in this worker'}
    return gate.info()
