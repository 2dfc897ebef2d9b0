"""``celery mutex``: see, judge and free the ZooKeeper leases of guarded tasks.

Installed as a Celery sub-command (entry point ``celery.commands``)::

    celery -A proj mutex list   [--json]
    celery -A proj mutex release KEY_OR_PATH | --task NAME | --task-id ID [--force] [--yes]
    celery -A proj mutex status [--json]

Where the data comes from:

* ZooKeeper: every lease node under the namespace (``<namespace>/<digest>`` or
  ``<digest>-<slot>``), its JSON data (holder, task, key values, acquired-at,
  timeout) and its stat (``czxid``: the fencing token; ``ephemeralOwner``: the
  session that holds it). Connection settings are the worker's: hosts from
  ``--mutex-hosts`` (on the sub-command or on ``mutex``), else the app config;
  namespace, digest credentials and TLS from the app config (``--namespace``
  and ``--mutex-auth`` override).
* The workers, through the ``mutex_leases`` remote-control command. A lease is
  *claimed* when a worker's reply lists its path and that worker's session is
  the node's owner.
* ``list`` also shows, per key, the messages that wait: in the workers'
  consumers and parked on the broker (:mod:`.waiting_report`).

How a lease is judged:

``held``        claimed, and younger than its ``mutex_timeout``.
``STALE``       older than its timeout (claimed or not: the worker should
                have killed the holder), or claimed by nobody although its
                own worker answered (or its data names no worker).
``unclaimed?``  claimed by nobody, but nobody who could claim it answered:
                no worker at all, or not the worker named in its data. A
                lease node only lives as long as its ZooKeeper session, so
                such a lease is held by a live process that is not answering;
                ``--force`` refuses it.

``release`` never frees a lease under a running task: it asks the worker that
holds it to kill the task first (``mutex_release``), then waits until the node
is gone. ``--force`` deletes only a lease no live worker claims, and checks
that again right before deleting.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import click
from celery.bin.base import CeleryCommand, CeleryOption, handle_preload_options
from celery.exceptions import CeleryCommandException
from celery.platforms import EX_FAILURE, EX_UNAVAILABLE, EX_USAGE
from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.hosts import collect_hosts
from kazoo.retry import KazooRetry

from .control import register_control_commands
from .options import MutexSettings, _validate_path, validate_hosts
from .payload import parse_lease_data
from .security import client_options, validate_auth
from .waiting_report import read_parked, waiting

__all__ = ('mutex',)

HELD, STALE, UNCLAIMED = 'held', 'STALE', 'unclaimed?'
LEASE_NAME = re.compile(r'^(?P<digest>[0-9a-f]{64})(?:-(?P<slot>\d+))?$')
KEY_ARGUMENT = re.compile(r'^[0-9a-f]+(?:-\d+)?$')
MIN_PREFIX = 6
DEFAULT_REPLY_TIMEOUT = 1.0
DEFAULT_ZK_TIMEOUT = 5.0
DEFAULT_WAIT = 30.0
_GROUP_HELP = 'ZooKeeper Options'
_OUTPUT_HELP = 'Output Options'

# kazoo logs every failed connection attempt; the command reports failures itself.
_kazoo_logger = logging.getLogger('celery_mutex_bootstep.command.kazoo')
_kazoo_logger.setLevel(logging.CRITICAL)


# --------------------------------------------------------------------------- options

@dataclass(frozen=True)
class Options:
    """The command line, sub-command values first, then the ``mutex`` group's."""

    hosts: Optional[str]
    auth: Optional[str]
    namespace: Optional[str]
    zk_timeout: float
    timeout: float
    as_json: bool


_OPTION_NAMES = ('mutex_hosts', 'mutex_auth', 'namespace', 'zk_timeout', 'timeout', 'as_json')


def _common_options(f: Callable) -> Callable:
    """ZooKeeper and output options, accepted by ``mutex`` and each sub-command."""
    options = [
        click.option('--mutex-hosts', cls=CeleryOption, default=None, help_group=_GROUP_HELP,
                     help='ZooKeeper hosts "host:port[,host:port...][/chroot]" (default: '
                          'app config mutex_hosts, then ZOOKEEPER_HOSTS, then localhost:2181).'),
        click.option('--mutex-auth', cls=CeleryOption, default=None, help_group=_GROUP_HELP,
                     help='ZooKeeper digest credentials "user:password" (default: app config '
                          'mutex_auth). Never shown.'),
        click.option('--namespace', cls=CeleryOption, default=None, help_group=_GROUP_HELP,
                     help='znode under which leases live (default: app config '
                          'mutex_namespace, then /celery-mutex).'),
        click.option('--zk-timeout', cls=CeleryOption, type=float, default=None,
                     help_group=_GROUP_HELP,
                     help=f'Seconds to wait for ZooKeeper (default {DEFAULT_ZK_TIMEOUT:g}).'),
        click.option('-t', '--timeout', cls=CeleryOption, type=float, default=None,
                     help_group=_OUTPUT_HELP,
                     help=f'Seconds to wait for the workers\' replies '
                          f'(default {DEFAULT_REPLY_TIMEOUT:g}).'),
        click.option('--json', 'as_json', cls=CeleryOption, is_flag=True, default=None,
                     help_group=_OUTPUT_HELP, help='Print JSON instead of tables.'),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _options(ctx: click.Context, values: Dict[str, Any]) -> Options:
    group = ctx.meta.get('celery_mutex.options', {})

    def pick(name: str, default: Any = None) -> Any:
        value = values.get(name)
        if value is None:
            value = group.get(name)
        return default if value is None else value

    return Options(hosts=pick('mutex_hosts'), auth=pick('mutex_auth'),
                   namespace=pick('namespace'),
                   zk_timeout=pick('zk_timeout', DEFAULT_ZK_TIMEOUT),
                   timeout=pick('timeout', DEFAULT_REPLY_TIMEOUT),
                   as_json=bool(pick('as_json', False)))


@dataclass(frozen=True)
class Target:
    """Where to look: resolved ZooKeeper settings and where the hosts came from."""

    settings: MutexSettings
    namespace: str
    hosts_source: str


def _hosts_source(conf: Any, given: Optional[str]) -> str:
    if given is not None:
        return '--mutex-hosts'
    for name in ('mutex_hosts', 'ZOOKEEPER_HOSTS'):
        if conf.get(name) is not None:
            return f'app config {name}'
    return 'default'


def _target(app: Any, opts: Options) -> Target:
    """Settings as the worker would read them; mistakes raise naming the flag."""
    if opts.hosts is not None:
        validate_hosts(opts.hosts, '--mutex-hosts')
    if opts.auth is not None:
        validate_auth(opts.auth, '--mutex-auth')
    settings = MutexSettings.from_app(app.conf, hosts=opts.hosts, auth=opts.auth)
    namespace = settings.namespace
    if opts.namespace is not None:
        namespace = _validate_path(opts.namespace, '--namespace').rstrip('/')
    return Target(settings, namespace, _hosts_source(app.conf, opts.hosts))


# --------------------------------------------------------------------------- ZooKeeper

def _unavailable(message: str) -> CeleryCommandException:
    return CeleryCommandException(message, exit_code=EX_UNAVAILABLE)


def _no_auth(target: Target, what: str) -> CeleryCommandException:
    given = ('the credentials given are not allowed there' if target.settings.auth
             else 'credentials are needed: pass --mutex-auth user:password or set '
                  'mutex_auth in the app config')
    return _unavailable(f'ZooKeeper refused to {what} {target.namespace}: {given}')


def _client(hosts: str, target: Target, timeout: float) -> KazooClient:
    return KazooClient(
        hosts=hosts, timeout=max(timeout, 4.0), logger=_kazoo_logger,
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
        command_retry=KazooRetry(max_tries=3, delay=0.1, max_delay=1.0),
        **client_options(target.settings.auth, target.settings.tls))


@contextmanager
def zookeeper(target: Target, timeout: float, hosts: Optional[str] = None) -> Iterator[KazooClient]:
    """A short-lived session; raises a clear error naming the hosts if none answers."""
    hosts = hosts or target.settings.hosts
    client = _client(hosts, target, timeout)
    try:
        client.start(timeout=timeout)
    except Exception as exc:
        _close(client)
        reason = 'no answer' if 'time' in str(exc).lower() else str(exc)
        raise _unavailable(
            f'cannot reach ZooKeeper at {hosts} (hosts from {target.hosts_source}) within '
            f'{timeout:g}s ({reason}): is it running, and are the hosts right?') from None
    try:
        yield client
    except (KazooException, KazooTimeoutError) as exc:
        raise _unavailable(f'ZooKeeper at {hosts} failed while the command ran: '
                           f'{type(exc).__name__} {exc}'.rstrip()) from None
    finally:
        _close(client)


def _close(client: KazooClient) -> None:
    try:
        client.stop()
        client.close()
    except Exception:
        pass


# --------------------------------------------------------------------------- leases

@dataclass
class LeaseNode:
    """One lease node as read from ZooKeeper, and how it was judged."""

    path: str
    name: str
    digest: str
    slot: Optional[int]
    data: dict
    token: int
    session_id: int
    created: float
    claimed_by: Optional[str] = None
    claim: dict = field(default_factory=dict)
    status: str = ''
    reason: str = ''

    @property
    def task(self) -> Optional[str]:
        return self.data.get('task') or self.claim.get('task')

    @property
    def task_id(self) -> Optional[str]:
        return self.data.get('task_id') or self.claim.get('task_id')

    @property
    def worker(self) -> Optional[str]:
        return self.data.get('worker')

    @property
    def acquired_at(self) -> float:
        value = self.data.get('acquired_at')
        return float(value) if isinstance(value, (int, float)) else self.created

    @property
    def timeout(self) -> Optional[float]:
        value = self.data.get('timeout')
        return float(value) if isinstance(value, (int, float)) else None

    def age(self, now: float) -> float:
        return max(0.0, now - self.acquired_at)

    def key_values(self) -> List[Tuple[str, Any]]:
        keys = self.data.get('keys') or []
        values = self.data.get('values')
        if values is None:
            return [(k, None) for k in keys]
        names = list(keys) + [f'#{i}' for i in range(len(keys), len(values))]
        return list(zip(names, values))

    def as_json(self, now: float) -> dict:
        return {
            'path': self.path, 'key': self.name, 'digest': self.digest, 'slot': self.slot,
            'status': self.status, 'stale': self.status == STALE, 'reason': self.reason,
            'task': self.task, 'mutex': self.data.get('mutex'),
            'key_values': {k: v for k, v in self.key_values()},
            'worker': self.worker, 'host': self.data.get('host'), 'pid': self.data.get('pid'),
            'task_id': self.task_id, 'acquired_at': self.acquired_at,
            'age': round(self.age(now), 3), 'timeout': self.timeout, 'token': self.token,
            'session_id': self.session_id, 'claimed_by': self.claimed_by,
        }


def read_leases(client: KazooClient, target: Target, timeout: float) -> List[LeaseNode]:
    """Every lease node under the namespace (its data and stat), read in parallel."""
    namespace = target.namespace
    try:
        children = client.get_children(namespace)
    except NoNodeError:
        return []
    except NoAuthError:
        raise _no_auth(target, 'list') from None
    names = sorted(c for c in children if LEASE_NAME.match(c))
    pending = [(name, client.get_async(f'{namespace}/{name}')) for name in names]
    leases = []
    for name, result in pending:
        try:
            raw, stat = result.get(timeout=timeout)
        except NoNodeError:
            continue  # released while we looked
        except NoAuthError:
            raise _no_auth(target, 'read leases in') from None
        m = LEASE_NAME.match(name)
        leases.append(LeaseNode(
            path=f'{namespace}/{name}', name=name, digest=m.group('digest'),
            slot=int(m.group('slot')) if m.group('slot') else None,
            data=parse_lease_data(raw), token=stat.czxid,
            session_id=stat.ephemeralOwner, created=stat.ctime / 1000.0))
    return leases


def still_there(client: KazooClient, leases: Sequence[LeaseNode]) -> List[LeaseNode]:
    """The leases whose node still exists as the same grant (same czxid)."""
    pending = [(lease, client.exists_async(lease.path)) for lease in leases]
    kept = []
    for lease, result in pending:
        try:
            stat = result.get(timeout=DEFAULT_ZK_TIMEOUT)
        except KazooException:
            kept.append(lease)
            continue
        if stat is not None and stat.czxid == lease.token:
            kept.append(lease)
    return kept


# --------------------------------------------------------------------------- workers

@dataclass
class Workers:
    """What the workers said to ``mutex_leases``."""

    replies: Dict[str, dict] = field(default_factory=dict)  # workers running MutexStep
    without_step: Dict[str, str] = field(default_factory=dict)
    error: Optional[str] = None
    timeout: float = DEFAULT_REPLY_TIMEOUT

    @property
    def answered(self) -> bool:
        return bool(self.replies)

    def owner_of_session(self, session_id: int) -> Optional[str]:
        for name, info in self.replies.items():
            if info.get('session_id') == session_id:
                return name
        return None


def ask_workers(app: Any, timeout: float, destination: Optional[List[str]] = None,
                workers: Optional[Workers] = None) -> Workers:
    """The workers' ``mutex_leases`` replies (all, or ``destination``'s, added to
    ``workers``); a broker failure is reported, not raised."""
    workers = workers or Workers(timeout=timeout)
    try:
        # With a destination the broadcast returns as soon as all of it answered.
        replies = app.control.broadcast('mutex_leases', reply=True, timeout=timeout,
                                        destination=destination) or []
    except Exception as exc:  # broker down: ZooKeeper's view is still worth showing
        workers.error = f'could not ask the workers through the broker: {exc}'
        return workers
    for reply in replies:
        for name, info in reply.items():
            if isinstance(info, dict) and 'error' not in info:
                workers.replies[name] = info
            else:
                error = info.get('error') if isinstance(info, dict) else info
                workers.without_step[name] = str(error)
    return workers


def _find_claim(lease: LeaseNode, workers: Workers) -> None:
    for name, info in workers.replies.items():
        if info.get('session_id') != lease.session_id:
            continue
        for entry in info.get('leases') or ():
            if entry.get('path') == lease.path:
                lease.claimed_by, lease.claim = name, entry
                return


def judge(lease: LeaseNode, workers: Workers, now: float) -> None:
    """Set ``status`` and ``reason`` (see the module docstring)."""
    _find_claim(lease, workers)
    timeout, age = lease.timeout, lease.age(now)
    overdue = timeout is not None and age > timeout
    overdue_text = f'held {_duration(age)}, past its timeout of {_duration(timeout or 0)}'
    if lease.claimed_by:
        lease.status = STALE if overdue else HELD
        lease.reason = (f'{overdue_text}: {lease.claimed_by} should have killed the task'
                        if overdue else '')
        return
    lease.status, lease.reason = _unclaimed(lease, workers)
    if overdue:  # its holder's time is up whoever may still hold it
        lease.status, lease.reason = STALE, f'{overdue_text}; {lease.reason}'


def _unclaimed(lease: LeaseNode, workers: Workers) -> Tuple[str, str]:
    """Status and reason of a lease no answering worker claims."""
    holder = lease.worker
    if not lease.session_id:
        return STALE, ('a persistent node, not an ephemeral lease: no session owns it, so '
                       'it never goes away by itself and blocks its key')
    if not workers.answered:
        return UNCLAIMED, ('no worker answered, so nobody could claim it'
                           + (f' ({workers.error})' if workers.error else ''))
    session_owner = workers.owner_of_session(lease.session_id)
    if session_owner:
        return STALE, (f'owned by the ZooKeeper session of {session_owner}, which does not '
                       f'list it (being released, or a create whose reply was lost)')
    if holder and holder not in workers.replies and holder not in workers.without_step:
        return UNCLAIMED, (f'its worker {holder} did not answer, and its ZooKeeper session '
                           f'is alive (host {lease.data.get("host")}, '
                           f'pid {lease.data.get("pid")})')
    return STALE, ('no live worker claims it'
                   + (f' ({holder} answered without it)' if holder
                      else ' (its data names no worker)'))


@dataclass
class Snapshot:
    """ZooKeeper's leases judged against the workers' replies."""

    target: Target
    leases: List[LeaseNode]
    workers: Workers
    taken_at: float

    @property
    def stale(self) -> List[LeaseNode]:
        return [lease for lease in self.leases if lease.status == STALE]


def snapshot(app: Any, client: KazooClient, target: Target, opts: Options) -> Snapshot:
    """Read the leases, ask the workers, judge; unclaimed leases are re-read so
    that one released (or granted) while the workers answered is not misjudged."""
    leases = read_leases(client, target, opts.zk_timeout)
    workers = ask_workers(app, opts.timeout) if leases else Workers(timeout=opts.timeout)
    now = time.time()
    for lease in leases:
        judge(lease, workers, now)
    silent = sorted({lease.worker for lease in leases if lease.status == UNCLAIMED
                     and workers.answered and lease.worker})
    if silent:  # a second, targeted chance for the holders that did not answer in time
        ask_workers(app, opts.timeout, destination=silent, workers=workers)
        for lease in leases:
            if lease.status == UNCLAIMED:
                judge(lease, workers, now)
    unclaimed = [lease for lease in leases if not lease.claimed_by]
    if unclaimed:
        kept = {id(lease) for lease in still_there(client, unclaimed)}
        leases = [lease for lease in leases if lease.claimed_by or id(lease) in kept]
    return Snapshot(target, leases, workers, now)


# --------------------------------------------------------------------------- formatting

def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return '-'
    if seconds < 60:
        return f'{seconds:.1f}s'
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f'{minutes}m{secs:02d}s'
    hours, minutes = divmod(minutes, 60)
    return f'{hours}h{minutes:02d}m'


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + '...'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = ['  '.join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    return '\n'.join(lines)


def _session_hex(session_id: Any) -> str:
    return f'0x{session_id:x}' if isinstance(session_id, int) else '-'


def _holder(lease: LeaseNode) -> str:
    worker = lease.worker or lease.claimed_by or '?'
    host, pid = lease.data.get('host'), lease.data.get('pid')
    where = f'pid {pid}' if host and host in worker else f'{host or "?"} pid {pid}'
    return f'{worker} ({where})'


def _key_values(lease: LeaseNode) -> str:
    pairs = lease.key_values()
    if not pairs:
        return '(whole task)' if 'keys' in lease.data else '?'
    # values are None when the workers do not store them (mutex_store_values)
    return _cut(', '.join(f'{k}={"?" if v is None else v}' for k, v in pairs), 40)


def _short_key(lease: LeaseNode) -> str:
    return lease.digest[:12] + (f'-{lease.slot}' if lease.slot is not None else '')


def _lease_row(lease: LeaseNode, now: float) -> List[str]:
    return [_short_key(lease), lease.status, lease.task or '?', _key_values(lease),
            _holder(lease), lease.task_id or '?', _duration(lease.age(now)),
            _duration(lease.timeout), str(lease.token)]


LEASE_HEADERS = ('KEY', 'STATUS', 'TASK', 'KEY VALUES', 'HOLDER', 'TASK ID', 'AGE',
                 'TIMEOUT', 'TOKEN')


def _workers_line(workers: Workers, names: bool = True) -> str:
    if workers.error:
        return f'Workers: {workers.error}.'
    if not workers.answered:
        extra = (f' ({len(workers.without_step)} without MutexStep)'
                 if workers.without_step else '')
        return (f'Workers: none answered within {workers.timeout:g}s{extra}: leases that no '
                f'worker claims are marked "{UNCLAIMED}", not STALE (are the workers '
                f'running? try a longer --timeout).')
    if not names:
        return f'Workers: {len(workers.replies)} answered within {workers.timeout:g}s:'
    return f'Workers answering: {", ".join(sorted(workers.replies))}.'


def render_list(snap: Snapshot) -> str:
    target = snap.target
    where = f'{target.namespace} on {target.settings.hosts}'
    if not snap.leases:
        return f'No leases in {where}.'
    rows = [_lease_row(lease, snap.taken_at) for lease in snap.leases]
    lines = [_table(LEASE_HEADERS, rows), '']
    counts = {s: sum(1 for lease in snap.leases if lease.status == s)
              for s in (HELD, STALE, UNCLAIMED)}
    summary = ', '.join(f'{n} {s}' for s, n in counts.items() if n)
    lines.append(f'{len(snap.leases)} lease(s) in {where}: {summary}.')
    lines.append(_workers_line(snap.workers))
    for lease in snap.leases:
        if lease.reason:
            lines.append(f'  {_short_key(lease)} {lease.status}: {lease.reason}')
    return '\n'.join(lines)


def list_json(snap: Snapshot) -> dict:
    return {
        'hosts': snap.target.settings.hosts, 'namespace': snap.target.namespace,
        'taken_at': snap.taken_at,
        'workers': {'answered': sorted(snap.workers.replies),
                    'without_step': sorted(snap.workers.without_step),
                    'error': snap.workers.error, 'timeout': snap.workers.timeout},
        'leases': [lease.as_json(snap.taken_at) for lease in snap.leases],
        'stale': len(snap.stale),
    }


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- release

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
    return (f'{lease.path}  {lease.status}  {lease.task or "?"}[{_key_values(lease)}]  '
            f'task {lease.task_id or "?"}  held by {_holder(lease)} for '
            f'{_duration(lease.age(now))}  token {lease.token}')


def _refuse(message: str, code: int = EX_USAGE) -> CeleryCommandException:
    return CeleryCommandException(message, exit_code=code)


def force_refusal(lease: LeaseNode) -> Optional[str]:
    """Why ``--force`` may not delete this lease (None: it may)."""
    if lease.claimed_by:
        return (f'refusing --force: {lease.path} is held by the live worker '
                f'{lease.claimed_by} (task {lease.task_id}). Release it without --force: '
                f'the worker kills the task first, so the lease is never freed under a '
                f'running task.')
    if lease.status != STALE:
        return (f'refusing --force: {lease.path} is {lease.status}: {lease.reason}. Nobody can '
                f'tell whether its task still runs. If its process is gone or hung, stop it '
                f'(the lease ends with its ZooKeeper session); if the workers are only slow, '
                f'retry with a longer --timeout.')
    return None


def check_force(targets: Sequence[LeaseNode]) -> None:
    """``--force`` deletes only leases no live worker claims."""
    for lease in targets:
        refusal = force_refusal(lease)
        if refusal:
            raise _refuse(refusal)


def check_release(targets: Sequence[LeaseNode]) -> None:
    """Without ``--force`` only a worker can free a lease: some target must be claimed."""
    if any(lease.claimed_by for lease in targets):
        return
    lease = targets[0]
    hint = ('delete it with --force' if lease.status == STALE else
            'no worker can release it now')
    raise _refuse(f'no live worker claims {lease.path} ({lease.status}: {lease.reason}): '
                  f'{hint}.', EX_FAILURE)


def confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin or not sys.stdin.isatty():
        raise _refuse('refusing to release without confirmation: stdin is not a terminal '
                      '(pass --yes to release non-interactively).')
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


def force_delete(app: Any, client: KazooClient, target: Target,
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
        refusal = force_refusal(now_lease)
        if refusal:  # claimed or no longer judged since the first look
            results.append({'path': lease.path, 'released': False, 'error': refusal})
            continue
        try:
            client.delete(lease.path)
        except NoNodeError:
            pass
        except NoAuthError:
            raise _no_auth(fresh.target, 'delete leases in') from None
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


# --------------------------------------------------------------------------- status

def four_letter(host: str, port: int, word: bytes, timeout: float,
                tls: Optional[dict]) -> str:
    """Send a ZooKeeper four-letter word and return the answer."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if tls is not None:
            sock = _ssl_context(tls).wrap_socket(sock, server_hostname=host)
        sock.sendall(word)
        chunks = []
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    return b''.join(chunks).decode('utf-8', 'replace')


def _ssl_context(tls: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.get('ca'))
    if tls.get('certfile'):
        context.load_cert_chain(tls['certfile'], tls.get('keyfile'), tls.get('keyfile_password'))
    verify = tls.get('verify_certs', True) is not False
    context.check_hostname = verify and bool(tls.get('check_hostname', False))
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    return context


def _parse_srvr(text: str) -> dict:
    fields = {}
    for line in text.splitlines():
        name, colon, value = line.partition(':')
        if colon:
            fields[name.strip().lower()] = value.strip()
    zxid = fields.get('zxid')
    return {
        'mode': fields.get('mode'), 'zxid': int(zxid, 16) if zxid else None,
        'version': (fields.get('zookeeper version') or '').split('-')[0].split(',')[0] or None,
        'connections': _int(fields.get('connections')),
        'node_count': _int(fields.get('node count')),
        'latency': fields.get('latency min/avg/max'),
    }


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _host_string(host: str, port: int) -> str:
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def probe_server(host: str, port: int, target: Target, timeout: float) -> dict:
    """One server: reachable? mode and zxid by ``srvr``, else through a session."""
    server = {'host': _host_string(host, port), 'reachable': False, 'mode': None,
              'zxid': None, 'via': None, 'error': None}
    try:
        text = four_letter(host, port, b'srvr', timeout, target.settings.tls)
    except OSError as exc:
        server['error'] = str(exc) or type(exc).__name__
        text = None
    if text and 'Mode:' in text:
        server.update(_parse_srvr(text), reachable=True, via='srvr')
        return server
    if text and 'not currently serving' in text:
        server.update(reachable=True, mode='not serving', via='srvr')
        return server
    if text is not None or target.settings.tls is not None:
        server['error'] = None
        server.update(_probe_by_session(host, port, target, timeout))
    return server


def _probe_by_session(host: str, port: int, target: Target, timeout: float) -> dict:
    """Fallback when ``srvr`` is not allowed: a session tells reachable and zxid."""
    try:
        with zookeeper(target, timeout, hosts=_host_string(host, port)) as client:
            client.sync('/')
            client.exists('/')
            return {'reachable': True, 'mode': 'unknown (srvr not allowed)',
                    'zxid': client.last_zxid, 'via': 'session'}
    except CeleryCommandException as exc:
        return {'reachable': False, 'error': exc.message}


def namespace_view(client: KazooClient, target: Target, opts: Options) -> dict:
    leases = read_leases(client, target, opts.zk_timeout)
    try:
        acls, _ = client.get_acls(target.namespace)
        acl = [f'{a.id.scheme}:{a.id.id}' for a in acls]
    except NoNodeError:
        acl = None
    except NoAuthError:
        acl = ['(not readable with these credentials)']
    session_id, _ = client.client_id
    return {'namespace': target.namespace, 'exists': acl is not None,
            'lease_count': len(leases), 'acl': acl, 'session_id': session_id,
            'sessions': _count_by_session(leases)}


def _count_by_session(leases: Sequence[LeaseNode]) -> Dict[int, int]:
    counts: Dict[int, int] = {}
    for lease in leases:
        counts[lease.session_id] = counts.get(lease.session_id, 0) + 1
    return counts


def worker_rows(workers: Workers, sessions: Dict[int, int]) -> List[dict]:
    rows = []
    for name, info in sorted(workers.replies.items()):
        counters = info.get('counters') or {}
        rows.append({
            'worker': name, 'session_id': info.get('session_id'),
            'state': info.get('session'), 'leases': len(info.get('leases') or ()),
            'leases_in_zookeeper': sessions.get(info.get('session_id'), 0),
            'waiting': len(info.get('waiting') or ()), 'counters': counters,
        })
    return rows


def render_status(data: dict) -> str:
    servers = data['zookeeper']['servers']
    lines = [f'ZooKeeper {data["zookeeper"]["hosts"]} (from {data["zookeeper"]["source"]}):']
    rows = [[s['host'], 'yes' if s['reachable'] else 'NO', s.get('mode') or '-',
             hex(s['zxid']) if isinstance(s.get('zxid'), int) else '-',
             s.get('version') or '-', str(s.get('connections') or '-'), s.get('error') or '']
            for s in servers]
    lines += ['  ' + line for line in _table(
        ('SERVER', 'REACHABLE', 'MODE', 'ZXID', 'VERSION', 'CONNECTIONS', 'ERROR'),
        rows).splitlines()]
    ns = data.get('namespace')
    if ns is None:
        lines.append(f'Namespace: not read ({data.get("namespace_error")}).')
    else:
        acl = ', '.join(ns['acl']) if ns['acl'] else '-'
        lines.append(f'Namespace {ns["namespace"]}: {ns["lease_count"]} lease(s)'
                     + ('' if ns['exists'] else ' (not created yet)')
                     + f'; ACL {acl}; this command\'s session {_session_hex(ns["session_id"])}.')
    lines.append(_workers_line(data['_workers'], names=False))
    if data['workers']:
        rows = [[w['worker'], _session_hex(w['session_id']), w['state'] or '?',
                 str(w['leases']), str(w['leases_in_zookeeper']), str(w['waiting']),
                 *(str(w['counters'].get(c, '-')) for c in STATUS_COUNTERS)]
                for w in data['workers']]
        lines += ['  ' + line for line in _table(
            ('WORKER', 'SESSION', 'STATE', 'LEASES', 'IN ZK', 'WAITING',
             *(c.upper() for c in STATUS_COUNTERS)), rows).splitlines()]
    for name, error in sorted(data['workers_without_step'].items()):
        lines.append(f'  {name}: {error}')
    return '\n'.join(lines)


STATUS_COUNTERS = ('acquired', 'contended', 'released', 'unavailable', 'lost')


# --------------------------------------------------------------------------- commands

def _format_options(command: click.Command, ctx: click.Context,
                    formatter: click.HelpFormatter) -> None:
    """Options by help group, as Celery's commands list them (arguments left out)."""
    groups: Dict[str, list] = {}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is not None:
            groups.setdefault(getattr(param, 'help_group', None) or 'Options', []).append(record)
    for name, records in groups.items():
        with formatter.section(name):
            formatter.write_dl(records)


class MutexCommand(CeleryCommand):
    """A sub-command; help lists options by group."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _format_options(self, ctx, formatter)


class MutexGroup(click.Group):
    """The ``mutex`` group; help lists options by group, then the sub-commands."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _format_options(self, ctx, formatter)
        self.format_commands(ctx, formatter)


# Celery imports this module (the ``celery.commands`` entry point) on every
# ``celery`` run, before any sub-command: registering here is what lets
# ``celery inspect mutex_leases`` / ``celery control mutex_release`` be
# recognised with an app module that never imports celery_mutex_bootstep.
register_control_commands()


@click.group(cls=MutexGroup)
@_common_options
@click.pass_context
@handle_preload_options
def mutex(ctx: click.Context, **kwargs: Any) -> None:
    """See and free the ZooKeeper leases of guarded tasks (celery-mutex-bootstep).

    ZooKeeper and output options may be given here or after the sub-command.
    """
    ctx.meta['celery_mutex.options'] = {k: kwargs.get(k) for k in _OPTION_NAMES}
    register_control_commands()


def _app(ctx: click.Context) -> Any:
    return ctx.obj.app


@mutex.command('list', cls=MutexCommand)
@_common_options
@click.pass_context
def list_(ctx: click.Context, **kwargs: Any) -> None:
    """Show every lease: task, key values, holder, task id, age, token; flag STALE ones;
    then, per key, the messages that wait (in the workers and parked) and the oldest wait.

    A lease is STALE when it is older than its mutex_timeout or when no live
    worker claims it; "unclaimed?" when nobody who could claim it answered.
    Exit status 0, or 1 when a lease is STALE.
    """
    opts = _options(ctx, kwargs)
    app = _app(ctx)
    target = _target(app, opts)
    with zookeeper(target, opts.zk_timeout) as client:
        snap = snapshot(app, client, target, opts)
        parked = read_parked(client, target.namespace, opts.zk_timeout)
    if parked and not snap.leases:  # lines nobody holds now: ask the workers anyway
        snap.workers = ask_workers(app, opts.timeout)
    waits = waiting(app, snap.leases, snap.workers.replies, parked, max(opts.timeout, 2.0))
    if opts.as_json:
        _emit_json({**list_json(snap), 'waiting': waits.as_json()})
    elif snap.leases or waits.keys:
        ctx.obj.echo(render_list(snap) + '\n\n' + waits.render())
    else:
        ctx.obj.echo(render_list(snap))
    if snap.stale:
        ctx.exit(EX_FAILURE)


@mutex.command('release', cls=MutexCommand)
@click.argument('key_or_path', required=False)
@click.option('--task', cls=CeleryOption, default=None, help_group='Release Options',
              help='Release every lease of this task (its registered name).')
@click.option('--task-id', cls=CeleryOption, default=None, help_group='Release Options',
              help='Release the lease held by this task id.')
@click.option('--force', cls=CeleryOption, is_flag=True, default=False,
              help_group='Release Options',
              help='Delete lease nodes that NO live worker claims (STALE). Refused for a '
                   'lease a worker holds.')
@click.option('-y', '--yes', cls=CeleryOption, is_flag=True, default=False,
              help_group='Release Options', help='Do not ask for confirmation.')
@click.option('--wait', cls=CeleryOption, type=float, default=DEFAULT_WAIT,
              help_group='Release Options',
              help=f'Seconds to wait for the node to go (default {DEFAULT_WAIT:g}).')
@_common_options
@click.pass_context
def release(ctx: click.Context, key_or_path: Optional[str], task: Optional[str],
            task_id: Optional[str], force: bool, yes: bool, wait: float,
            **kwargs: Any) -> None:
    """Free leases: by KEY_OR_PATH (node path, key, or unique key prefix), --task or --task-id.

    The worker holding a lease kills its task first (it ends REVOKED) and then
    releases it, so a lease is never freed under a running task; this command
    waits until the node is gone. --force deletes a lease no live worker
    claims. Asks for confirmation unless --yes.
    """
    given = [v for v in (key_or_path, task, task_id) if v is not None]
    if len(given) != 1:
        raise click.UsageError('give exactly one of KEY_OR_PATH, --task NAME or --task-id ID')
    opts = _options(ctx, kwargs)
    app = _app(ctx)
    target = _target(app, opts)
    with zookeeper(target, opts.zk_timeout) as client:
        snap = snapshot(app, client, target, opts)
        targets = select(snap, key_or_path, task, task_id)
        if not targets:
            raise _refuse(f'no lease matches {given[0]!r} in {target.namespace} '
                          f'(already released?)', EX_FAILURE)
        if force:
            check_force(targets)
        else:
            check_release(targets)
        todo = targets if force else [lease for lease in targets if lease.claimed_by]
        skipped = [] if force else [lease for lease in targets if not lease.claimed_by]
        verb = 'Delete (--force)' if force else 'Release (killing its task first)'
        click.echo(f'{verb} {len(todo)} lease(s):', err=opts.as_json)
        for lease in todo:
            click.echo(f'  {_describe(lease, snap.taken_at)}', err=opts.as_json)
        confirm(yes, 'Proceed?')
        if force:
            results = force_delete(app, client, target, todo, opts)
        else:
            results = release_claimed(app, client, todo, opts, wait)
    if opts.as_json:
        _emit_json({'results': results,
                         'skipped': [lease.as_json(snap.taken_at) for lease in skipped]})
    else:
        ctx.obj.echo(render_release(results, skipped))
    if skipped or not all(r['released'] for r in results):
        ctx.exit(EX_FAILURE)


@mutex.command('status', cls=MutexCommand)
@_common_options
@click.pass_context
def status(ctx: click.Context, **kwargs: Any) -> None:
    """The ZooKeeper servers (mode, zxid), the namespace, and each worker's session.

    Exit status 0 when every server serves, 1 when some does not, 69 when
    ZooKeeper cannot be used at all.
    """
    opts = _options(ctx, kwargs)
    app = _app(ctx)
    target = _target(app, opts)
    data = status_data(app, target, opts)
    if opts.as_json:
        _emit_json({k: v for k, v in data.items() if not k.startswith('_')})
    else:
        ctx.obj.echo(render_status(data))
    serving = [s for s in data['zookeeper']['servers'] if s['reachable']
               and s.get('mode') != 'not serving']
    if data.get('namespace') is None:
        ctx.exit(EX_UNAVAILABLE)
    if len(serving) < len(data['zookeeper']['servers']):
        ctx.exit(EX_FAILURE)


def status_data(app: Any, target: Target, opts: Options) -> dict:
    hosts, chroot = collect_hosts(target.settings.hosts)
    servers = [probe_server(h, p, target, opts.zk_timeout) for h, p in hosts]
    data: Dict[str, Any] = {
        'zookeeper': {'hosts': target.settings.hosts, 'source': target.hosts_source,
                      'chroot': chroot, 'servers': servers},
        'namespace': None, 'namespace_error': None,
    }
    sessions: Dict[int, int] = {}
    try:
        with zookeeper(target, opts.zk_timeout) as client:
            data['namespace'] = namespace_view(client, target, opts)
            sessions = data['namespace'].pop('sessions')
    except CeleryCommandException as exc:
        data['namespace_error'] = exc.message
    workers = ask_workers(app, opts.timeout)
    data['_workers'] = workers
    data['workers'] = worker_rows(workers, sessions)
    data['workers_without_step'] = dict(workers.without_step)
    data['workers_error'] = workers.error
    return data
