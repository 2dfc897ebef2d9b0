"""Output shared by the sub-commands: how a lease and the workers are shown, and JSON."""
from __future__ import annotations

import json
from typing import Any

import click

from ..text import cut
from .leases import UNCLAIMED, LeaseNode
from .workers import Workers


def session_hex(session_id: Any) -> str:
    return f'0x{session_id:x}' if isinstance(session_id, int) else '-'


def holder(lease: LeaseNode) -> str:
    worker = lease.worker or lease.claimed_by or '?'
    host, pid = lease.data.get('host'), lease.data.get('pid')
    where = f'pid {pid}' if host and host in worker else f'{host or "?"} pid {pid}'
    return f'{worker} ({where})'


def key_values(lease: LeaseNode) -> str:
    pairs = lease.key_values()
    if not pairs:
        return '(whole task)' if 'keys' in lease.data else '?'
    # values are None when the workers do not store them (mutex_store_values)
    return cut(', '.join(f'{k}={"?" if v is None else v}' for k, v in pairs), 40)


def short_key(lease: LeaseNode) -> str:
    return lease.digest[:12] + (f'-{lease.slot}' if lease.slot is not None else '')


def workers_line(workers: Workers, names: bool = True) -> str:
    if workers.error:
        return f'Workers: {workers.error}.'
    if not workers.answered:
        extra = (f' ({len(workers.without_step)} without MutexStep)'
                 if workers.without_step else '')
        return (f'Workers: none answered within {workers.timeout:g}s{extra}: leases that no '
                f'worker claims are marked "{UNCLAIMED}", not STALE (are the workers '
                f'running? try a longer --timeout).')
    silent = sorted(set(workers.asked or ()) - set(workers.replies) - set(workers.without_step))
    missing = f' (not answering: {", ".join(silent)})' if silent else ''
    if not names:
        return f'Workers: {len(workers.replies)} answered within {workers.timeout:g}s{missing}:'
    return f'Workers answering: {", ".join(sorted(workers.replies))}{missing}.'


def emit_json(data: Any) -> None:
    """One line, as ``celery inspect --json`` prints it."""
    click.echo(json.dumps(data, sort_keys=True, default=str))
