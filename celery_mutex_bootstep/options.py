"""Reading and validating the step's options: app-wide settings and per-task policies.

Everything here runs when the worker starts, so a mistake stops the worker
with an error that names the task (or flag) and the option, instead of
surfacing later as a task that never runs.

Per-task options (``@app.task(mutex_keys=('account',), ...)``):

``mutex``               ``True`` guards the whole task (one mutex per task).
``mutex_keys``          parameter names whose values refine the mutex; an
                        empty tuple also guards the task.
``mutex_name``          share one mutex between several tasks.
``mutex_timeout``       seconds a holder may run (default ``mutex_timeout``
                        / ``MUTEX_TIMEOUT`` app config, else 3600).
``mutex_requeue_delay`` seconds a contended message is held in the consumer
                        before it goes back to the broker (default 1).
``mutex_contended``     ``'requeue'`` (default), ``'skip'``, ``'coalesce'``
                        (:mod:`.supersede`) or ``'replace'`` (:mod:`.replacing`); the older
                        libraries' ``mutex_requeue=True/False`` is an alias.
``mutex_limit``         holders allowed at once per key (a semaphore; 1).
``mutex_republish_after`` deliveries (RabbitMQ quorum queues' count) after
                        which a contended message is republished as a fresh
                        copy instead of requeued, so a delivery limit never
                        drops it (default 10; 0 turns it off).
``mutex_wait_timeout``  seconds a contended call may wait for its key (in the
                        consumer or parked) before it fails with
                        ``MutexContended`` (default ``mutex_wait_timeout``
                        app config, else no limit).
"""
from __future__ import annotations

import inspect
import ipaddress
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from kazoo.hosts import collect_hosts

from .exceptions import MutexConfigError, MutexKeyError
from .keys import key_digest
from .security import validate_auth, validate_tls

__all__ = (
    'DEFAULT_HOSTS', 'DEFAULT_NAMESPACE', 'MutexSettings', 'MutexPolicy',
    'MutexKey', 'policy_for_task', 'validate_hosts',
)

DEFAULT_HOSTS = 'localhost:2181'
DEFAULT_NAMESPACE = '/celery-mutex'
DEFAULT_TIMEOUT = 3600.0
DEFAULT_REQUEUE_DELAY = 1.0
DEFAULT_SESSION_TIMEOUT = 10.0
DEFAULT_MAX_HELD = 64
DEFAULT_REPUBLISH_AFTER = 10
CONTENDED_POLICIES = ('requeue', 'skip', 'coalesce', 'replace')
SESSION_LOSS_POLICIES = ('kill', 'continue')


def _number(value: Any, what: str, *, minimum: float = 0.0,
            allow_equal: bool = False) -> float:
    """Parse a number of seconds (int, float or numeric string)."""
    if isinstance(value, bool):
        raise MutexConfigError(f'{what} must be a number of seconds, got {value!r}')
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MutexConfigError(
            f'{what} must be a number of seconds, got {value!r}') from None
    if not math.isfinite(number) or number < minimum or (
            number == minimum and not allow_equal):
        bound = f'>= {minimum:g}' if allow_equal else f'> {minimum:g}'
        raise MutexConfigError(f'{what} must be {bound}, got {value!r}')
    return number


def _integer(value: Any, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise MutexConfigError(f'{what} must be an integer, got {value!r}')
    try:
        number = int(value)
    except ValueError:
        raise MutexConfigError(f'{what} must be an integer, got {value!r}') from None
    if number < minimum:
        raise MutexConfigError(f'{what} must be >= {minimum}, got {value!r}')
    return number


def validate_hosts(hosts: Any, source: str = '--mutex-hosts') -> str:
    """Check a kazoo hosts string; return it stripped or raise naming the bad part.

    Format: comma-separated ``host[:port]``, IPv6 in brackets, an optional
    ``/chroot`` suffix (``zk1:2181,[::1]:2182/apps/billing``).
    """
    if not isinstance(hosts, str) or not hosts.strip():
        raise MutexConfigError(f'{source}: expected "host:port[,host:port...][/chroot]", got {hosts!r}')
    hosts = hosts.strip()
    host_part, slash, chroot = hosts.partition('/')
    if slash:
        _validate_path('/' + chroot, f'{source}: chroot')
    for part in host_part.split(','):
        item = part.strip()
        if not item:
            raise MutexConfigError(f'{source}: empty host in {hosts!r}')
        if item.startswith('['):
            addr, _, rest = item[1:].partition(']')
            try:
                ipaddress.IPv6Address(addr)
            except ValueError:
                raise MutexConfigError(
                    f'{source}: {item!r} is not a bracketed IPv6 address') from None
            port = rest[1:] if rest.startswith(':') else None
            if rest and port is None:
                raise MutexConfigError(f'{source}: unexpected {rest!r} after {item!r}')
        else:
            host, colon, port = item.partition(':')
            if not colon:
                port = None
            elif ':' in port:
                raise MutexConfigError(
                    f'{source}: {item!r} has several colons; write IPv6 as [addr]:port')
            if not host or any(c.isspace() or c in '@?#[]' for c in host):
                raise MutexConfigError(f'{source}: bad host name in {item!r}')
        if port is not None and port != '':
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise MutexConfigError(f'{source}: bad port {port!r} in {item!r}')
        elif port == '':
            raise MutexConfigError(f'{source}: missing port after ":" in {item!r}')
    try:  # the parser kazoo itself will use must agree
        collect_hosts(hosts)
    except ValueError as exc:
        raise MutexConfigError(f'{source}: {hosts!r}: {exc}') from None
    return hosts


def _validate_path(path: Any, what: str) -> str:
    if not isinstance(path, str) or not path.startswith('/') or path == '/':
        raise MutexConfigError(f'{what} must be an absolute znode path like "/celery-mutex", got {path!r}')
    parts = path[1:].split('/')
    for p in parts:
        if p in ('', '.', '..') or '\x00' in p:
            raise MutexConfigError(f'{what}: invalid znode path {path!r}')
    if parts[0] == 'zookeeper':
        raise MutexConfigError(f'{what}: /zookeeper is reserved by ZooKeeper')
    return path


def _contended(value: Any, requeue: Any, what: str) -> Optional[str]:
    """``mutex_contended``, or the older libraries' ``mutex_requeue`` bool."""
    if requeue is not None:
        if not isinstance(requeue, bool):
            raise MutexConfigError(f'{what.replace("mutex_contended", "mutex_requeue")} '
                                   f'must be True or False, got {requeue!r}')
        alias = 'requeue' if requeue else 'skip'
        if value is not None and value != alias:
            raise MutexConfigError(f'{what}={value!r} contradicts mutex_requeue={requeue!r}')
        value = alias
    if value is not None and value not in CONTENDED_POLICIES:
        raise MutexConfigError(
            f'{what} must be one of {", ".join(map(repr, CONTENDED_POLICIES))}, got {value!r}')
    return value


def _republish_after(value: Any, what: str, default: int) -> int:
    return default if value is None else _integer(value, what, minimum=0)


def _conf(conf: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        value = conf.get(name)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class MutexSettings:
    """Worker-wide settings: CLI flag, then app config, then defaults."""

    hosts: str = DEFAULT_HOSTS
    namespace: str = DEFAULT_NAMESPACE
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    timeout: float = DEFAULT_TIMEOUT
    requeue_delay: float = DEFAULT_REQUEUE_DELAY
    max_held: int = DEFAULT_MAX_HELD
    store_values: bool = True
    contended: str = 'requeue'
    republish_after: int = DEFAULT_REPUBLISH_AFTER
    on_session_loss: str = 'kill'
    session_margin: Optional[float] = None
    auth: Optional[str] = field(default=None, repr=False)
    tls: Optional[dict] = None
    require_lease: bool = True
    park: bool = True
    #: Leases a worker may take beyond its pool's processes (no hoarding);
    #: None: one per process, so a process never waits for ZooKeeper between tasks.
    lease_ahead: Optional[int] = None
    #: Default ``mutex_wait_timeout`` (None: wait without limit).
    wait_timeout: Optional[float] = None

    @classmethod
    def from_app(cls, conf: Mapping[str, Any], *,
                 hosts: Optional[str] = None,
                 session_timeout: Any = None,
                 on_session_loss: Optional[str] = None,
                 auth: Optional[str] = None) -> 'MutexSettings':
        if hosts is not None:
            hosts_source = '--mutex-hosts'
        elif conf.get('mutex_hosts') is not None:
            hosts, hosts_source = conf.get('mutex_hosts'), 'mutex_hosts'
        elif conf.get('ZOOKEEPER_HOSTS') is not None:
            hosts, hosts_source = conf.get('ZOOKEEPER_HOSTS'), 'ZOOKEEPER_HOSTS'
        else:
            hosts, hosts_source = DEFAULT_HOSTS, 'default'
        if session_timeout is not None:
            st_source = '--mutex-session-timeout'
        else:
            session_timeout = conf.get('mutex_session_timeout')
            st_source = 'mutex_session_timeout'
        if on_session_loss is not None:
            loss_source = '--mutex-on-session-loss'
        else:
            on_session_loss = conf.get('mutex_on_session_loss') or 'kill'
            loss_source = 'app config mutex_on_session_loss'
        if on_session_loss not in SESSION_LOSS_POLICIES:
            raise MutexConfigError(
                f'{loss_source} must be one of '
                f'{", ".join(map(repr, SESSION_LOSS_POLICIES))}, got {on_session_loss!r}')
        margin = conf.get('mutex_session_margin')
        timeout = _conf(conf, 'mutex_timeout', 'MUTEX_TIMEOUT')
        delay = conf.get('mutex_requeue_delay')
        max_held = conf.get('mutex_max_held')
        ahead = conf.get('mutex_lease_ahead')
        wait = conf.get('mutex_wait_timeout')
        return cls(
            hosts=validate_hosts(hosts, hosts_source),
            namespace=_validate_path(
                conf.get('mutex_namespace') or DEFAULT_NAMESPACE,
                'mutex_namespace').rstrip('/'),
            session_timeout=(DEFAULT_SESSION_TIMEOUT if session_timeout is None
                             else _number(session_timeout, st_source)),
            timeout=(DEFAULT_TIMEOUT if timeout is None
                     else _number(timeout, 'app config mutex_timeout')),
            # 0 would hand a contended message back at once: a broker hot loop.
            requeue_delay=(DEFAULT_REQUEUE_DELAY if delay is None else _number(
                delay, 'app config mutex_requeue_delay')),
            max_held=(DEFAULT_MAX_HELD if max_held is None
                      else _integer(max_held, 'app config mutex_max_held', minimum=0)),
            store_values=bool(conf.get('mutex_store_values', True)),
            contended=_contended(conf.get('mutex_contended'), None,
                                 'app config mutex_contended') or 'requeue',
            republish_after=_republish_after(conf.get('mutex_republish_after'),
                                             'app config mutex_republish_after',
                                             DEFAULT_REPUBLISH_AFTER),
            on_session_loss=on_session_loss,
            session_margin=(None if margin is None else _number(
                margin, 'app config mutex_session_margin', allow_equal=True)),
            auth=(validate_auth(auth, '--mutex-auth') if auth is not None
                  else validate_auth(conf.get('mutex_auth'), 'app config mutex_auth')),
            tls=validate_tls(conf.get('mutex_tls'), 'app config mutex_tls'),
            require_lease=bool(conf.get('mutex_require_lease', True)),
            park=bool(conf.get('mutex_park', True)),
            lease_ahead=(None if ahead is None
                         else _integer(ahead, 'app config mutex_lease_ahead', minimum=0)),
            wait_timeout=(None if wait is None
                          else _number(wait, 'app config mutex_wait_timeout')),
        )


@dataclass(frozen=True)
class MutexKey:
    """One key of one policy: the znode name and the values it came from."""

    digest: str
    values: tuple
    policy: 'MutexPolicy' = field(repr=False, compare=False)

    @property
    def slots(self) -> tuple:
        """Lease node names: the digest, or one per semaphore slot."""
        limit = self.policy.limit
        return (self.digest,) if limit == 1 else tuple(
            f'{self.digest}-{i}' for i in range(limit))

    @property
    def in_flight(self) -> tuple:
        """What a first try counts in the gate's in-flight tally: the key, and
        ``r<digest>`` for a reader (readers need not wait for readers)."""
        return (self.digest, 'r' + self.digest) if self.policy.shared else (self.digest,)

    def asking_ahead(self, in_flight: Mapping[str, int]) -> int:
        """First tries of this key not answered yet that it must queue behind
        (a reader does not wait for readers)."""
        readers = in_flight['r' + self.digest] if self.policy.shared else 0
        return in_flight[self.digest] - readers

    def describe(self) -> str:
        """Human text for logs: ``task[account=7]``."""
        pairs = ', '.join(f'{k}={v!r}'[:80] for k, v in zip(self.policy.keys, self.values))
        return f'{self.policy.name}[{pairs}]'


@dataclass(frozen=True)
class MutexPolicy:
    """A guarded task's validated mutex options."""

    task: str
    name: str
    keys: tuple
    timeout: float
    requeue_delay: float
    contended: str = 'requeue'
    limit: int = 1
    republish_after: int = DEFAULT_REPUBLISH_AFTER
    wait_timeout: Optional[float] = None
    #: ``mutex_shared``: a reader (shared lock, :mod:`.shared`).
    shared: bool = False
    signature: Optional[inspect.Signature] = field(default=None, repr=False, compare=False)

    def key_for(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> MutexKey:
        """Bind a request's arguments and derive its key (raises MutexKeyError)."""
        values: tuple = ()
        if self.keys:
            if self.signature is None:
                raise MutexKeyError(f'task {self.task!r}: no signature to bind arguments')
            try:
                bound = self.signature.bind(*(args or ()), **(kwargs or {}))
            except TypeError as exc:
                raise MutexKeyError(
                    f'task {self.task!r}: arguments do not match the task signature '
                    f'{self.signature}: {exc}') from None
            bound.apply_defaults()
            values = tuple(bound.arguments[k] for k in self.keys)
        digest = key_digest(self.name, values, task=self.task, params=self.keys)
        return MutexKey(digest=digest, values=values, policy=self)


def _task_signature(task: Any) -> inspect.Signature:
    run = getattr(task, 'run', None)
    if run is None:
        raise TypeError('task has no run method')
    return inspect.signature(run)


def policy_for_task(task: Any, settings: MutexSettings) -> Optional[MutexPolicy]:
    """Return the task's validated policy, None when it is not guarded.

    Raises :class:`MutexConfigError` naming the task and option on any mistake.
    """
    name = task.name
    mutex = getattr(task, 'mutex', None)
    keys = getattr(task, 'mutex_keys', None)
    if not mutex and keys is None:
        return None
    if mutex not in (None, True, False):
        raise MutexConfigError(f'task {name!r}: option mutex must be True or False, got {mutex!r}')

    def bad(option: str, problem: str) -> MutexConfigError:
        return MutexConfigError(f'task {name!r}: option {option} {problem}')

    if keys is None:
        keys = ()
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (tuple, list)):
        raise bad('mutex_keys', f'must be a tuple of parameter names, got {keys!r} '
                  f'(for one name write ({keys!r},))' if isinstance(keys, str)
                  else f'must be a tuple of parameter names, got {keys!r}')
    keys = tuple(keys)
    signature = None
    if keys:
        try:
            signature = _task_signature(task)
        except (TypeError, ValueError) as exc:
            raise bad('mutex_keys', f'cannot be checked: no signature ({exc})') from None
        params = signature.parameters
        for k in keys:
            if not isinstance(k, str):
                raise bad('mutex_keys', f'entry {k!r} is not a parameter name')
            p = params.get(k)
            if p is None or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                choices = ', '.join(n for n, q in params.items()
                                    if q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD))
                raise bad('mutex_keys', f'entry {k!r} is not a parameter of the '
                          f'function (parameters: {choices or "none"})')
        if len(set(keys)) != len(keys):
            raise bad('mutex_keys', f'names a parameter twice: {keys!r}')

    mutex_name = getattr(task, 'mutex_name', None)
    if mutex_name is None:
        mutex_name = name
    elif not isinstance(mutex_name, str) or not mutex_name:
        raise bad('mutex_name', f'must be a non-empty string, got {mutex_name!r}')

    timeout = getattr(task, 'mutex_timeout', None)
    timeout = settings.timeout if timeout is None else _number(
        timeout, f'task {name!r}: option mutex_timeout')
    delay = getattr(task, 'mutex_requeue_delay', None)
    delay = settings.requeue_delay if delay is None else _number(
        delay, f'task {name!r}: option mutex_requeue_delay')
    contended = _contended(getattr(task, 'mutex_contended', None),
                           getattr(task, 'mutex_requeue', None),
                           f'task {name!r}: option mutex_contended') or settings.contended
    limit = getattr(task, 'mutex_limit', None)
    limit = 1 if limit is None else _integer(limit, f'task {name!r}: option mutex_limit', minimum=1)
    republish = _republish_after(getattr(task, 'mutex_republish_after', None),
                                 f'task {name!r}: option mutex_republish_after',
                                 settings.republish_after)
    wait_timeout = getattr(task, 'mutex_wait_timeout', None)
    wait_timeout = settings.wait_timeout if wait_timeout is None else _number(
        wait_timeout, f'task {name!r}: option mutex_wait_timeout')
    shared = getattr(task, 'mutex_shared', None)
    if shared is not None and not isinstance(shared, bool):
        raise bad('mutex_shared', f'must be True or False, not {shared!r}')
    return MutexPolicy(task=name, name=mutex_name, keys=keys, timeout=timeout,
                       requeue_delay=delay, contended=contended, limit=limit,
                       republish_after=republish, wait_timeout=wait_timeout,
                       shared=bool(shared), signature=signature)

