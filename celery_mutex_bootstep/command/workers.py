"""The workers' view (``mutex_leases``), and each lease judged against it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from kazoo.client import KazooClient

from ..text import duration
from .leases import HELD, STALE, UNCLAIMED, LeaseNode, read_leases, still_there
from .options import DEFAULT_REPLY_TIMEOUT, Options, Target


@dataclass
class Workers:
    """What the workers said to ``mutex_leases``."""

    replies: Dict[str, dict] = field(default_factory=dict)  # workers running MutexStep
    without_step: Dict[str, str] = field(default_factory=dict)
    error: Optional[str] = None
    timeout: float = DEFAULT_REPLY_TIMEOUT
    asked: Optional[List[str]] = None  # --destination; None: every worker

    @property
    def answered(self) -> bool:
        return bool(self.replies)

    def was_asked(self, name: str) -> bool:
        return self.asked is None or name in self.asked

    def owner_of_session(self, session_id: int) -> Optional[str]:
        for name, info in self.replies.items():
            if info.get('session_id') == session_id:
                return name
        return None


def ask_workers(app: Any, timeout: float, destination: Optional[List[str]] = None,
                workers: Optional[Workers] = None) -> Workers:
    """The workers' ``mutex_leases`` replies (all, or ``destination``'s, added to
    ``workers``); a broker failure is reported, not raised."""
    workers = workers or Workers(timeout=timeout, asked=destination)
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
    overdue_text = f'held {duration(age)}, past its timeout of {duration(timeout or 0)}'
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
    session_owner = workers.owner_of_session(lease.session_id)
    if session_owner:
        return STALE, (f'owned by the ZooKeeper session of {session_owner}, which does not '
                       f'list it (being released, or a create whose reply was lost)')
    alive = (f'and its ZooKeeper session is alive (host {lease.data.get("host")}, '
             f'pid {lease.data.get("pid")})')
    if holder and not workers.was_asked(holder) and not workers.error:
        return UNCLAIMED, f'its worker {holder} was not asked (-d), {alive}'
    if not workers.answered:
        return UNCLAIMED, ('no worker answered, so nobody could claim it'
                           + (f' ({workers.error})' if workers.error else ''))
    if holder and holder not in workers.replies and holder not in workers.without_step:
        return UNCLAIMED, f'its worker {holder} did not answer, {alive}'
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
    workers = (ask_workers(app, opts.timeout, opts.destination) if leases
               else Workers(timeout=opts.timeout, asked=opts.destination))
    now = time.time()
    for lease in leases:
        judge(lease, workers, now)
    silent = sorted({lease.worker for lease in leases if lease.status == UNCLAIMED
                     and workers.answered and lease.worker and workers.was_asked(lease.worker)})
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
