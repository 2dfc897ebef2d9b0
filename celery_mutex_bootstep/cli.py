"""Worker flags and ``install(app)``: one call adds the step and its flags."""
from __future__ import annotations

from typing import Any

import click
from celery.bin.base import CeleryOption

from .control import register_control_commands
from .failclosed import guard_tasks
from .step import MutexStep

__all__ = ('install', 'worker_options')

_GROUP = 'Mutex Options'


def worker_options() -> list:
    """The ``celery worker`` flags the step reads (unset flags give None)."""
    return [
        CeleryOption(
            ['--mutex-hosts'], default=None, help_group=_GROUP,
            help=('ZooKeeper hosts for task mutexes: "host:port[,host:port...]'
                  '[/chroot]" (default: app config mutex_hosts, then '
                  'ZOOKEEPER_HOSTS, then localhost:2181).')),
        CeleryOption(
            ['--mutex-session-timeout'], default=None, type=float,
            help_group=_GROUP,
            help=('ZooKeeper session timeout in seconds (default: app config '
                  'mutex_session_timeout, then 10).')),
        CeleryOption(
            ['--mutex-on-session-loss'], default=None,
            type=click.Choice(['kill', 'continue']), help_group=_GROUP,
            help=('What running holders do when the ZooKeeper session is lost: '
                  '"kill" (default: SIGKILL, the task runs again elsewhere) or '
                  '"continue" (they finish, without exclusivity).')),
        CeleryOption(
            ['--mutex-auth'], default=None, help_group=_GROUP,
            help=('ZooKeeper digest credentials "user:password"; every node the '
                  'step creates is then readable and deletable by that user only '
                  '(default: app config mutex_auth). Never logged.')),
        CeleryOption(
            ['--without-mutex'], is_flag=True, default=False, help_group=_GROUP,
            help=('Do not start MutexStep: guarded tasks then refuse to run here '
                  'and go back to the broker.')),
    ]


def install(app: Any) -> Any:
    """Add MutexStep to ``app``'s consumer and its flags to ``celery worker``.

    Idempotent: calling it twice adds nothing twice. Returns ``app``.
    """
    app.steps['consumer'].add(MutexStep)
    register_control_commands()
    if not getattr(app, '_mutex_guard_connected', False):
        app._mutex_guard_connected = True
        app.on_after_finalize.connect(_guard_after_finalize, weak=False)
        if app.finalized:
            guard_tasks(app)
    options = app.user_options['worker']
    present = {opt for param in options for opt in getattr(param, 'opts', ())}
    for param in worker_options():
        if not present.intersection(param.opts):
            options.add(param)
    return app


def _guard_after_finalize(sender: Any = None, **kwargs: Any) -> None:
    guard_tasks(sender)
