"""``celery mutex``: see, judge and free the ZooKeeper leases of guarded tasks.

Installed as a Celery sub-command (entry point ``celery.commands``)::

    celery -A proj mutex list   [-j] [-d WORKERS] [-t SECONDS]
    celery -A proj mutex release KEY_OR_PATH | --task NAME | --task-id ID [--delete-stale] [--yes]
    celery -A proj mutex status [-j] [-d WORKERS] [-t SECONDS]

One module per sub-command (:mod:`.listing`, :mod:`.release`, :mod:`.status`);
what they share: :mod:`.options` (the options, declared once, as
``celery inspect`` spells them), :mod:`.exits` (the exit statuses), :mod:`.zk`
(the ZooKeeper session), :mod:`.leases` (the lease nodes), :mod:`.workers`
(the workers' replies, and judging), :mod:`.output`.

Where the data comes from:

* ZooKeeper: every lease node under the namespace (``<namespace>/<digest>`` or
  ``<digest>-<slot>``), its JSON data (holder, task, key values, acquired-at,
  timeout) and its stat (``czxid``: the fencing token; ``ephemeralOwner``: the
  session that holds it). Connection settings are the worker's: hosts from
  ``--mutex-hosts``, else the app config; namespace, digest credentials and
  TLS from the app config (``--namespace`` and ``--mutex-auth`` override).
* The workers (all, or ``-d``'s), through the ``mutex_leases`` remote-control
  command. A lease is *claimed* when a worker's reply lists its path and that
  worker's session is the node's owner.
* ``list`` also shows, per key, the messages that wait: in the workers'
  consumers and parked on the broker (:mod:`..waiting_report`).

How a lease is judged:

``held``        claimed, and younger than its ``mutex_timeout``.
``STALE``       older than its timeout (claimed or not: the worker should
                have killed the holder), or claimed by nobody although its
                own worker answered (or its data names no worker).
``unclaimed?``  claimed by nobody, but nobody who could claim it answered:
                no worker at all, or not the worker named in its data (or
                that worker was not asked, ``-d``). A lease node only lives
                as long as its ZooKeeper session, so such a lease is held by
                a live process that is not answering; ``--delete-stale``
                refuses it.

``release`` never frees a lease under a running task: it asks the worker that
holds it to kill the task first (``mutex_release``), then waits until the node
is gone. ``--delete-stale`` deletes only a STALE lease no live worker claims,
and checks that again right before deleting.
"""
from __future__ import annotations

from typing import Any, List

import click
from celery.bin.base import handle_preload_options

from ..control import register_control_commands
from .listing import list_
from .options import SHARED_FLAGS
from .release import release
from .status import status

__all__ = ('mutex',)

# Celery imports this package (the ``celery.commands`` entry point) on every
# ``celery`` run, before any sub-command: registering here is what lets
# ``celery inspect mutex_leases`` / ``celery control mutex_release`` be
# recognised with an app module that never imports celery_mutex_bootstep.
register_control_commands()

EXIT_STATUS = """\b
Exit status, every sub-command:
  0   done, and nothing wrong was found
  1   done, but something is wrong or was not done: a STALE lease (list),
      a ZooKeeper server not serving (status), a lease not released (release)
  2   usage: a bad option, argument or app setting (the message names it)
  69  ZooKeeper cannot be used, or the broker (the workers cannot be asked)
"""


class MutexGroup(click.Group):
    """Options are the sub-commands' (as ``celery inspect -j`` has them): one given
    before the sub-command gets a message that says where it goes."""

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            if exc.option_name in SHARED_FLAGS:
                exc.message = (f'{exc.option_name} goes after the sub-command, as in '
                               f'"celery mutex list {exc.option_name} ..."')
            raise


@click.group(cls=MutexGroup, epilog=EXIT_STATUS)
@click.pass_context
@handle_preload_options
def mutex(ctx: click.Context, **kwargs: Any) -> None:
    """See and free the ZooKeeper leases of guarded tasks (celery-mutex-bootstep).

    Options go after the sub-command: celery mutex list --json.
    """
    register_control_commands()


for _command in (list_, release, status):
    mutex.add_command(_command)
