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

from typing import Any

import click
from celery.bin.base import handle_preload_options

from ..control import register_control_commands
from .listing import list_
from .options import OPTION_NAMES, MutexGroup, common_options
from .release import release
from .status import status

__all__ = ('mutex',)

# Celery imports this package (the ``celery.commands`` entry point) on every
# ``celery`` run, before any sub-command: registering here is what lets
# ``celery inspect mutex_leases`` / ``celery control mutex_release`` be
# recognised with an app module that never imports celery_mutex_bootstep.
register_control_commands()


@click.group(cls=MutexGroup)
@common_options
@click.pass_context
@handle_preload_options
def mutex(ctx: click.Context, **kwargs: Any) -> None:
    """See and free the ZooKeeper leases of guarded tasks (celery-mutex-bootstep).

    ZooKeeper and output options may be given here or after the sub-command.
    """
    ctx.meta['celery_mutex.options'] = {k: kwargs.get(k) for k in OPTION_NAMES}
    register_control_commands()


for _command in (list_, release, status):
    mutex.add_command(_command)
