"""The command line shared by the sub-commands: ZooKeeper and output options,
and the ZooKeeper settings they resolve to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import click
from celery.bin.base import CeleryCommand, CeleryOption

from ..options import MutexSettings, _validate_path, validate_hosts
from ..security import validate_auth

DEFAULT_REPLY_TIMEOUT = 1.0
DEFAULT_ZK_TIMEOUT = 5.0
_GROUP_HELP = 'ZooKeeper Options'
_OUTPUT_HELP = 'Output Options'


@dataclass(frozen=True)
class Options:
    """The command line, sub-command values first, then the ``mutex`` group's."""

    hosts: Optional[str]
    auth: Optional[str]
    namespace: Optional[str]
    zk_timeout: float
    timeout: float
    as_json: bool


OPTION_NAMES = ('mutex_hosts', 'mutex_auth', 'namespace', 'zk_timeout', 'timeout', 'as_json')


def common_options(f: Callable) -> Callable:
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


def options_from(ctx: click.Context, values: Dict[str, Any]) -> Options:
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
