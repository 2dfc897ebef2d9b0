"""Remote control: ``celery inspect mutex_leases`` asks each worker for its view.

Nothing is registered on import: :func:`register_control_commands` adds the
commands to Celery's ``Panel``. The step and :func:`install` call it (so a
worker answers them) and so does the ``celery mutex`` command module, which
Celery imports as a ``celery.commands`` entry point on every ``celery`` run
(so ``celery inspect mutex_leases`` is recognised with an app that never
imports this package).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

from celery.worker.control import control_command, inspect_command

from .metrics import prometheus_address

__all__ = ('mutex_leases', 'mutex_release', 'register_control_commands')


def mutex_leases(state: Any) -> dict:
    """This worker's leases (with task ids), waiting messages, session and counters."""
    gate = getattr(state.consumer, 'mutex_gate', None)
    if gate is None:
        return {'error': 'MutexStep is not running in this worker'}
    # Where this worker's Prometheus exporter ended up (it may have moved past a
    # taken mutex_prometheus_port), so a scrape config can be checked against it.
    return {**gate.info(), 'prometheus': prometheus_address()}


_SELECTORS = ('key', 'task_id', 'task')


def parse_selectors(selectors: Sequence[str]) -> Dict[str, str]:
    """``['task_id=X', 'task=T']`` -> ``{'task_id': 'X', 'task': 'T'}``; bad input raises
    ValueError naming it."""
    parsed: Dict[str, str] = {}
    for item in selectors:
        name, sep, value = str(item).partition('=')
        if not sep or name not in _SELECTORS or not value:
            raise ValueError(f'bad argument {item!r}: expected key=KEY, task_id=ID or task=NAME')
        parsed[name] = value
    return parsed


def mutex_release(state: Any, selectors: Sequence[str] = (), key: Any = None,
                  task_id: Any = None, task: Any = None, replaced_by: Any = None) -> dict:
    """Free leases held here: kill their tasks first, then release (never under a
    running task). ``replaced_by``: another worker's ``mutex_contended='replace'``
    call asks (with ``task_id``); the holder ends REVOKED with that reason."""
    gate = getattr(state.consumer, 'mutex_gate', None)
    if gate is None:
        return {'error': 'MutexStep is not running in this worker'}
    if replaced_by and task_id:
        return {'ok': gate.replacing.stop_here(str(task_id), str(replaced_by))}
    # `celery control mutex_release task_id=X` arrives as selectors=['task_id=X']
    # (Celery passes command-line arguments by position); a program may also
    # broadcast key/task_id/task as named arguments.
    try:
        named = parse_selectors(selectors or ())
    except ValueError as exc:
        return {'error': str(exc)}
    key = named.get('key', key)
    task_id = named.get('task_id', task_id)
    task = named.get('task', task)
    if not (key or task_id or task):
        return {'error': 'give key=KEY, task_id=ID or task=NAME'}
    released = gate.release_matching(key=key, task_id=task_id, task=task)
    if not released:
        return {'ok': [], 'note': 'no lease held here matched'}
    return {'ok': released}

_registered = False


def register_control_commands() -> None:
    """Add ``mutex_leases`` (inspect) and ``mutex_release`` (control) to Celery's
    remote-control Panel. Idempotent."""
    global _registered
    if _registered:
        return
    inspect_command()(mutex_leases)
    # variadic, not args=[...]: Celery's CLI binds args by position, so
    # `task_id=X` would arrive as key='task_id=X'.
    control_command(
        variadic='selectors',
        signature='[key=KEY] [task_id=ID] [task=NAME]',
    )(mutex_release)
    _registered = True
