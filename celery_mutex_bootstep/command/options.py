"""The options every sub-command takes, declared once (:func:`mutex_options`):
ZooKeeper's, and ``celery inspect``'s ``-t/--timeout``, ``-d/--destination``
and ``-j/--json``; and the ZooKeeper settings they resolve to."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import click
from celery.bin.base import COMMA_SEPARATED_LIST, CeleryOption

from ..options import MutexSettings, _validate_path, validate_hosts
from ..security import validate_auth

__all__ = ('Options', 'Target', 'mutex_options', 'target_for', 'SHARED_FLAGS',
           'DEFAULT_REPLY_TIMEOUT', 'DEFAULT_ZK_TIMEOUT')

DEFAULT_REPLY_TIMEOUT = 1.0  # celery inspect's
DEFAULT_ZK_TIMEOUT = 5.0
_ZK = 'ZooKeeper Options'
_REMOTE = 'Remote Control Options'  # the group celery inspect lists -t and -d under
_OUTPUT = 'Output Options'


@dataclass(frozen=True)
class Options:
    """The shared options of one run."""

    hosts: Optional[str]
    auth: Optional[str]
    namespace: Optional[str]
    zk_timeout: float
    timeout: float
    destination: Optional[List[str]]
    as_json: bool


# (declarations, Options field, click attributes), in the order help lists them.
_SHARED = (
    (('--mutex-hosts',), 'hosts', dict(
        help_group=_ZK, help='ZooKeeper hosts "host:port[,host:port...][/chroot]" (default: '
        'app config mutex_hosts, then ZOOKEEPER_HOSTS, then localhost:2181).')),
    (('--mutex-auth',), 'auth', dict(
        help_group=_ZK, help='ZooKeeper digest credentials "user:password" (default: app '
        'config mutex_auth). Never shown.')),
    (('--namespace',), 'namespace', dict(
        help_group=_ZK, help='znode under which leases live (default: app config '
        'mutex_namespace, then /celery-mutex).')),
    (('--zk-timeout',), 'zk_timeout', dict(
        type=float, default=DEFAULT_ZK_TIMEOUT, show_default=True, help_group=_ZK,
        help='Seconds to wait for ZooKeeper.')),
    (('-t', '--timeout'), 'timeout', dict(
        type=float, default=DEFAULT_REPLY_TIMEOUT, show_default=True, help_group=_REMOTE,
        help="Seconds to wait for the workers' replies.")),
    (('-d', '--destination'), 'destination', dict(
        type=COMMA_SEPARATED_LIST, help_group=_REMOTE,
        help='Comma separated list of the worker node names to ask (default: all). '
             'Leases of the others are then "unclaimed?": not judged.')),
    (('-j', '--json'), 'as_json', dict(
        is_flag=True, default=False, help_group=_OUTPUT,
        help='Print one line of JSON instead of tables.')),
)

# Every spelling of a shared option, to tell someone who put one before the sub-command.
SHARED_FLAGS = frozenset(flag for decls, _, _ in _SHARED for flag in decls)


def mutex_options(f: Callable) -> Callable:
    """Add the shared options to a sub-command; it receives them as ``opts: Options``."""
    fields = [name for _, name, _ in _SHARED]

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        opts = Options(**{name: kwargs.pop(name) for name in fields})
        return f(*args, opts=opts, **kwargs)

    for decls, name, attrs in reversed(_SHARED):
        command = click.option(*decls, name, cls=CeleryOption, **attrs)(command)
    return command


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


def target_for(app: Any, opts: Options) -> Target:
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
