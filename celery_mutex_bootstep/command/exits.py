"""One exit status scheme for every ``celery mutex`` sub-command.

====  ==================================================================
0     done, and nothing wrong was found
1     done, but something is wrong or was not done: a STALE lease
      (``list``), a ZooKeeper server that does not serve (``status``), a
      lease not released, nothing matched, a refused ``--delete-stale``,
      the confirmation declined (``release``)
2     usage: a bad option, argument or app setting (the message names
      it), an ambiguous key prefix, an option before the sub-command, no
      terminal to confirm on without ``--yes``; click's own status for
      usage errors
69    unavailable (``EX_UNAVAILABLE``, as ``celery inspect`` exits when
      it cannot ask): ZooKeeper unreachable or refusing the credentials,
      or the broker unreachable, so the workers could not be asked
      (``list`` and ``status`` still print what ZooKeeper shows)
====  ==================================================================

No worker answering is not an error: their leases are shown ``unclaimed?``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from celery.exceptions import CeleryCommandException
from celery.platforms import EX_UNAVAILABLE

__all__ = ('OK', 'PROBLEM', 'USAGE', 'UNAVAILABLE', 'problem', 'unavailable',
           'list_status', 'release_status', 'status_status')

OK, PROBLEM, USAGE, UNAVAILABLE = 0, 1, 2, EX_UNAVAILABLE


def problem(message: str) -> CeleryCommandException:
    return CeleryCommandException(message, exit_code=PROBLEM)


def unavailable(message: str) -> CeleryCommandException:
    return CeleryCommandException(message, exit_code=UNAVAILABLE)


def list_status(stale: int, broker_error: Optional[str]) -> int:
    """``list``: a view partly missing outranks what it shows."""
    if broker_error:
        return UNAVAILABLE
    return PROBLEM if stale else OK


def release_status(released: Sequence[bool], skipped: int,
                   broker_error: Optional[str]) -> int:
    """``release``: one result per lease acted on, plus those left alone."""
    if skipped or not all(released):
        return UNAVAILABLE if broker_error else PROBLEM
    return OK


def status_status(namespace_read: bool, servers: int, serving: int,
                  broker_error: Optional[str]) -> int:
    """``status``: ZooKeeper unusable or the broker away, else every server serving."""
    if not namespace_read or broker_error:
        return UNAVAILABLE
    return PROBLEM if serving < servers else OK
