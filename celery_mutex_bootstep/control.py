"""Remote control: ``celery inspect mutex_leases`` asks each worker for its view."""
from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command

from .metrics import prometheus_address

__all__ = ('mutex_leases', 'mutex_release')


@inspect_command()
def mutex_leases(state: Any) -> dict:
    """This worker's leases (with task ids), waiting messages, session and counters."""
    gate = getattr(state.consumer, 'mutex_gate', None)
    if gate is None:
        return {'error': 'MutexStep is not running in this worker'}
    # Where this worker's Prometheus exporter ended up (it may have moved past a
    # taken mutex_prometheus_port), so a scrape config can be checked against it.
    return {**gate.info(), 'prometheus': prometheus_address()}


@control_command(
    args=[('key', str), ('task_id', str), ('task', str)],
    signature='[key=KEY] [task_id=ID] [task=NAME]',
)
def mutex_release(state: Any, key: Any = None, task_id: Any = None, task: Any = None) -> dict:
    """Free leases held here: kill their tasks first, then release (never under a running task)."""
    gate = getattr(state.consumer, 'mutex_gate', None)
    if gate is None:
        return {'error': 'MutexStep is not running in this worker'}
    if not (key or task_id or task):
        return {'error': 'give key, task_id or task'}
    released = gate.release_matching(key=key, task_id=task_id, task=task)
    if not released:
        return {'ok': [], 'note': 'no lease held here matched'}
    return {'ok': released}
