"""``celery mutex release``: free leases, by asking their worker to kill the task
first, or (``--delete-stale``) by deleting a STALE node no live worker claims."""
from __future__ import annotations

import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import click
from celery.bin.base import CeleryCommand, CeleryOption
from celery.exceptions import CeleryCommandException
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NoNodeError

from ..text import duration
from .exits import PROBLEM, UNAVAILABLE, problem, release_status
from .leases import STALE, LeaseNode, still_there
from .options import Options, Target, mutex_options, target_for
from .output import emit_json, holder, key_values
from .workers import Snapshot, Workers, snapshot
from .zk import no_auth, zookeeper

KEY_ARGUMENT = re.compile(r'^[0-9a-f]+(?:-\d+)?$')
MIN_PREFIX = 6
DEFAULT_WAIT = 30.0


def _select_by_key(leases: Sequence[LeaseNode], value: str, namespace: str) -> List[LeaseNode]:
    """Leases named by a path, a node name, a digest (all its slots) or a unique prefix."""
    name = value.strip().rstrip('/')
    if name.startswith('/'):
        parent, _, name = name.rpartition('/')
        if parent != namespace:
            raise click.UsageError(
                f'KEY_OR_PATH: {value!r} is not under the namespace {namespace} '
                f'(give --namespace if the leases live elsewhere)')
    if not KEY_ARGUMENT.match(name):
        raise click.UsageError(
            f'KEY_OR_PATH: {value!r} is not a lease key: give the node path, its name '
            f'(64 hex digits, "-N" for a semaphore slot) or a unique prefix of it '
            f'(at least {MIN_PREFIX} characters)')
    exact = [lease for lease in leases if name in (lease.name, lease.digest)]
    if exact:
        return exact
    if len(name) < MIN_PREFIX:
        raise click.UsageError(f'KEY_OR_PATH: a key prefix needs at least {MIN_PREFIX} '
                               f'characters, got {name!r}')
    found = [lease for lease in leases if lease.name.startswith(name)]
    if len({lease.digest for lease in found}) > 1:
        raise click.UsageError(
            f'KEY_OR_PATH: prefix {name!r} matches several keys: '
            + ', '.join(sorted(lease.name for lease in found)))
    return found


def select(snap: Snapshot, key: Optional[str], task: Optional[str],
           task_id: Optional[str]) -> List[LeaseNode]:
    if key is not None:
        return _select_by_key(snap.leases, key, snap.target.namespace)
    if task is not None:
        return [lease for lease in snap.leases if lease.task == task]
    return [lease for lease in snap.leases if lease.task_id == task_id]


def _describe(lease: LeaseNode, now: float) -> str:
    return (f'{lease.path}  {lease.status}  {lease.task or "?"}[{key_values(lease)}]  '
            f'task {lease.task_id or "?"}  held by {holder(lease)} for '
            f'{duration(lease.age(now))}  token {lease.token}')


def _refuse(message: str, workers: Workers) -> CeleryCommandException:
    # Refused because the broker could not be asked: that is the problem to fix.
    return CeleryCommandException(message,
                                  exit_code=UNAVAILABLE if workers.error else PROBLEM)


def delete_refusal(lease: LeaseNode) -> Optional[str]:
    """Why ``--delete-stale`` may not delete this lease (None: it may)."""
    if lease.claimed_by:
        return (f'refusing --delete-stale: {lease.path} is held by the live worker '
                f'{lease.claimed_by} (task {lease.task_id}). Release it without '
                f'--delete-stale: the worker kills the task first, so the lease is never '
                f'freed under a running task.')
    if lease.status != STALE:
        return (f'refusing --delete-stale: {lease.path} is {lease.status}: {lease.reason}. '
                f'Nobody can '
                f'tell whether its task still runs. If its process is gone or hung, stop it '
                f'(the lease ends with its ZooKeeper session); if the workers are only slow, '
                f'retry with a longer --timeout.')
    return None


def check_delete(targets: Sequence[LeaseNode], workers: Workers) -> None:
    """``--delete-stale`` deletes only STALE leases no live worker claims."""
    for lease in targets:
        refusal = delete_refusal(lease)
        if refusal:
            raise _refuse(refusal, workers)


def check_release(targets: Sequence[LeaseNode], workers: Workers) -> None:
    """Without ``--delete-stale`` only a worker can free a lease: some target must be
    claimed."""
    if any(lease.claimed_by for lease in targets):
        return
    lease = targets[0]
    hint = ('delete it with --delete-stale' if lease.status == STALE else
            'no worker can release it now')
    raise _refuse(f'no live worker claims {lease.path} ({lease.status}: {lease.reason}): '
                  f'{hint}.', workers)


def confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin or not sys.stdin.isatty():
        raise click.UsageError('refusing to release without confirmation: stdin is not a '
                               'terminal (pass --yes to release non-interactively).')
    click.confirm(question, default=False, abort=True, err=True)


def ask_release(app: Any, lease: LeaseNode, timeout: float) -> dict:
    """Ask the holding worker to kill the lease's task and release it."""
    # By task id when known: it names exactly the confirmed holder, so a task
    # that already ended never turns into killing the key's next holder.
    arguments = {'task_id': lease.task_id} if lease.claim.get('task_id') else {'key': lease.name}
    try:
        replies = app.control.broadcast('mutex_release', arguments=arguments, reply=True,
                                        destination=[lease.claimed_by], timeout=timeout)
    except Exception as exc:
        return {'error': f'could not reach {lease.claimed_by} through the broker: {exc}'}
    for reply in replies or ():
        if lease.claimed_by in reply:
            return reply[lease.claimed_by]
    return {'error': f'{lease.claimed_by} did not answer within {timeout:g}s'}


def wait_gone(client: KazooClient, leases: Sequence[LeaseNode], wait: float) -> Dict[str, float]:
    """Seconds until each lease's node was gone (or re-granted); missing = still there."""
    started = time.monotonic()
    gone: Dict[str, float] = {}
    while True:
        left = [lease for lease in leases if lease.path not in gone]
        still = {lease.path for lease in still_there(client, left)}
        for lease in left:
            if lease.path not in still:
                gone[lease.path] = round(time.monotonic() - started, 3)
        if len(gone) == len(leases) or time.monotonic() - started > wait:
            return gone
        time.sleep(0.1)


def release_claimed(app: Any, client: KazooClient, targets: Sequence[LeaseNode],
                    opts: Options, wait: float) -> List[dict]:
    claimed = [lease for lease in targets if lease.claimed_by]
    asked = {lease.path: ask_release(app, lease, max(opts.timeout, 2.0)) for lease in claimed}
    # Only a worker that took the request frees the node: wait for those.
    gone = wait_gone(client, [lease for lease in claimed
                              if isinstance(asked[lease.path].get('ok'), list)], wait)
    results = []
    for lease in claimed:
        reply = asked[lease.path]
        done = reply.get('ok')
        result = {'path': lease.path, 'task_id': lease.task_id, 'worker': lease.claimed_by,
                  'actions': done or [],
                  'error': None if isinstance(done, list) else str(reply.get('error', reply))}
        if lease.path in gone:
            result.update(released=True, seconds=gone[lease.path])
        else:
            result.update(released=False, error=result['error'] or
                          f'the node is still there after {wait:g}s')
        results.append(result)
    return results


def delete_stale_nodes(app: Any, client: KazooClient, target: Target,
                       targets: Sequence[LeaseNode], opts: Options) -> List[dict]:
    """Delete unclaimed STALE leases, judged again right before (time may have passed).

    ZooKeeper cannot delete on a creation zxid, so a node re-granted in the
    instant between this check and the delete is the one gap left.
    """
    fresh = snapshot(app, client, target, opts)
    by_path = {lease.path: lease for lease in fresh.leases}
    results = []
    for lease in targets:
        now_lease = by_path.get(lease.path)
        if now_lease is None or now_lease.token != lease.token:
            results.append({'path': lease.path, 'released': True, 'deleted': False,
                            'note': 'already gone'})
            continue
        refusal = delete_refusal(now_lease)
        if refusal:  # claimed or no longer judged since the first look
            results.append({'path': lease.path, 'released': False, 'error': refusal})
            continue
        try:
            client.delete(lease.path)
        except NoNodeError:
            pass
        except NoAuthError:
            raise no_auth(fresh.target, 'delete leases in') from None
        results.append({'path': lease.path, 'released': True, 'deleted': True,
                        'token': lease.token})
    return results


def render_release(results: Sequence[dict], skipped: Sequence[LeaseNode]) -> str:
    lines = []
    for r in results:
        for action in r.get('actions') or ():
            lines.append(f'{r["worker"]}: {action["action"]} {action["task"]}[{action["task_id"]}]')
        if r.get('deleted'):
            lines.append(f'deleted {r["path"]} (token {r["token"]})')
        elif r.get('note'):
            lines.append(f'{r["path"]}: {r["note"]}')
        elif r['released']:
            lines.append(f'released {r["path"]} (node gone after {r["seconds"]:g}s)')
        else:
            lines.append(f'NOT released {r["path"]}: {r["error"]}')
    for lease in skipped:
        lines.append(f'skipped {lease.path}: {lease.status}, no live worker claims it '
                     f'({lease.reason})')
    return '\n'.join(lines)


@click.command('release', cls=CeleryCommand)
@click.argument('key_or_path', required=False)
@click.option('--task', cls=CeleryOption, default=None, help_group='Release Options',
              help='Release every lease of this task (its registered name).')
@click.option('--task-id', cls=CeleryOption, default=None, help_group='Release Options',
              help='Release the lease held by this task id.')
@click.option('--delete-stale', cls=CeleryOption, is_flag=True, default=False,
              help_group='Release Options',
              help='Delete the STALE lease nodes that no live worker claims, instead of '
                   'asking a worker. Refused for a lease a worker claims, or one nobody '
                   'could judge ("unclaimed?").')
# Deprecated: in `celery purge` --force means "do not prompt", here it deleted nodes.
@click.option('--force', is_flag=True, default=False, hidden=True)
@click.option('-y', '--yes', cls=CeleryOption, is_flag=True, default=False,
              help_group='Release Options', help='Do not ask for confirmation.')
@click.option('--wait', cls=CeleryOption, type=float, default=DEFAULT_WAIT,
              show_default=True, help_group='Release Options',
              help='Seconds to wait for the node to go.')
@mutex_options
@click.pass_context
def release(ctx: click.Context, key_or_path: Optional[str], task: Optional[str],
            task_id: Optional[str], delete_stale: bool, force: bool, yes: bool, wait: float,
            opts: Options) -> None:
    """Free leases: by KEY_OR_PATH (node path, key, or unique key prefix), --task or --task-id.

    The worker holding a lease kills its task first (it ends REVOKED) and then
    releases it, so a lease is never freed under a running task; this command
    waits until the node is gone. --delete-stale deletes a STALE lease no
    live worker claims. Asks for confirmation unless --yes. Exit status 1
    when a lease matched was not released (see celery mutex --help).
    """
    given = [v for v in (key_or_path, task, task_id) if v is not None]
    if len(given) != 1:
        raise click.UsageError('give exactly one of KEY_OR_PATH, --task NAME or --task-id ID')
    if force:
        click.echo('celery mutex release: --force is deprecated and will go: it means '
                   '--delete-stale (use --yes not to be asked).', err=True)
        delete_stale = True
    app = ctx.obj.app
    target = target_for(app, opts)
    with zookeeper(target, opts.zk_timeout) as client:
        snap = snapshot(app, client, target, opts)
        targets = select(snap, key_or_path, task, task_id)
        if not targets:
            raise problem(f'no lease matches {given[0]!r} in {target.namespace} '
                          f'(already released?)')
        if delete_stale:
            check_delete(targets, snap.workers)
        else:
            check_release(targets, snap.workers)
        todo = targets if delete_stale else [lease for lease in targets if lease.claimed_by]
        skipped = [] if delete_stale else [lease for lease in targets if not lease.claimed_by]
        verb = 'Delete (--delete-stale)' if delete_stale else 'Release (killing its task first)'
        click.echo(f'{verb} {len(todo)} lease(s):', err=opts.as_json)
        for lease in todo:
            click.echo(f'  {_describe(lease, snap.taken_at)}', err=opts.as_json)
        confirm(yes, 'Proceed?')
        if delete_stale:
            results = delete_stale_nodes(app, client, target, todo, opts)
        else:
            results = release_claimed(app, client, todo, opts, wait)
    if opts.as_json:
        emit_json({'results': results,
                   'skipped': [lease.as_json(snap.taken_at) for lease in skipped]})
    else:
        ctx.obj.echo(render_release(results, skipped))
    ctx.exit(release_status([r['released'] for r in results], len(skipped),
                            snap.workers.error))
