"""``celery mutex list``: every lease, judged, and per key what waits."""
from __future__ import annotations

from typing import List

import click
from celery.bin.base import CeleryCommand

from ..text import duration, table
from ..waiting_report import read_parked, waiting
from .exits import list_status
from .leases import HELD, STALE, UNCLAIMED, LeaseNode
from .options import Options, mutex_options, target_for
from .output import emit_json, holder, key_values, short_key, workers_line
from .workers import Snapshot, ask_workers, snapshot
from .zk import zookeeper

LEASE_HEADERS = ('KEY', 'STATUS', 'TASK', 'KEY VALUES', 'HOLDER', 'TASK ID', 'AGE',
                 'TIMEOUT', 'TOKEN')


def _task(lease: LeaseNode) -> str:
    """The holder's task, with its policy when it is not the default ``requeue``."""
    contended = lease.data.get('contended')
    shared = ' (shared)' if lease.data.get('shared') is True else ''
    return (lease.task or '?') + (f' ({contended})' if isinstance(contended, str) else '') + shared


def _lease_row(lease: LeaseNode, now: float) -> List[str]:
    return [short_key(lease), lease.status, _task(lease), key_values(lease),
            holder(lease), lease.task_id or '?', duration(lease.age(now)),
            duration(lease.timeout), str(lease.token)]


def render_list(snap: Snapshot) -> str:
    target = snap.target
    where = f'{target.namespace} on {target.settings.hosts}'
    if not snap.leases:
        return f'No leases in {where}.'
    rows = [_lease_row(lease, snap.taken_at) for lease in snap.leases]
    lines = [table(LEASE_HEADERS, rows), '']
    counts = {s: sum(1 for lease in snap.leases if lease.status == s)
              for s in (HELD, STALE, UNCLAIMED)}
    summary = ', '.join(f'{n} {s}' for s, n in counts.items() if n)
    lines.append(f'{len(snap.leases)} lease(s) in {where}: {summary}.')
    lines.append(workers_line(snap.workers))
    for lease in snap.leases:
        if lease.reason:
            lines.append(f'  {short_key(lease)} {lease.status}: {lease.reason}')
    return '\n'.join(lines)


def list_json(snap: Snapshot) -> dict:
    return {
        'hosts': snap.target.settings.hosts, 'namespace': snap.target.namespace,
        'taken_at': snap.taken_at,
        'workers': {'asked': snap.workers.asked, 'answered': sorted(snap.workers.replies),
                    'without_step': sorted(snap.workers.without_step),
                    'error': snap.workers.error, 'timeout': snap.workers.timeout},
        'leases': [lease.as_json(snap.taken_at) for lease in snap.leases],
        'stale': len(snap.stale),
    }


@click.command('list', cls=CeleryCommand)
@mutex_options
@click.pass_context
def list_(ctx: click.Context, opts: Options) -> None:
    """Show every lease: task, key values, holder, task id, age, token; flag STALE ones;
    then, per key, the messages that wait (in the workers and parked) and the oldest wait.

    A lease is STALE when it is older than its mutex_timeout or when no live
    worker claims it; "unclaimed?" when nobody who could claim it answered.
    Exit status 1 when a lease is STALE, 69 when ZooKeeper or the broker
    cannot be used (see celery mutex --help).
    """
    app = ctx.obj.app
    target = target_for(app, opts)
    with zookeeper(target, opts.zk_timeout) as client:
        snap = snapshot(app, client, target, opts)
        parked = read_parked(client, target.namespace, opts.zk_timeout)
    if parked and not snap.leases:  # lines nobody holds now: ask the workers anyway
        snap.workers = ask_workers(app, opts.timeout, opts.destination)
    waits = waiting(app, snap.leases, snap.workers.replies, parked, max(opts.timeout, 2.0))
    if opts.as_json:
        emit_json({**list_json(snap), 'waiting': waits.as_json()})
    elif snap.leases or waits.keys:
        ctx.obj.echo(render_list(snap) + '\n\n' + waits.render())
    else:
        ctx.obj.echo(render_list(snap))
    ctx.exit(list_status(len(snap.stale), snap.workers.error or waits.parked_error))
