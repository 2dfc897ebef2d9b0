"""Lease nodes as read from ZooKeeper."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoAuthError, NoNodeError

from ..payload import parse_lease_data
from .options import DEFAULT_ZK_TIMEOUT, Target
from .zk import no_auth

HELD, STALE, UNCLAIMED = 'held', 'STALE', 'unclaimed?'
LEASE_NAME = re.compile(r'^(?P<digest>[0-9a-f]{64})(?:-(?P<slot>\d+))?$')


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
            'contended': self.data.get('contended') or 'requeue',
            'shared': self.data.get('shared') is True,
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
        raise no_auth(target, 'list') from None
    names = sorted(c for c in children if LEASE_NAME.match(c))
    pending = [(name, f'{namespace}/{name}', client.get_async(f'{namespace}/{name}'))
               for name in names]
    leases = []
    for name, path, result in pending:
        try:
            raw, stat = result.get(timeout=timeout)
        except NoNodeError:
            continue  # released while we looked
        except NoAuthError:
            raise no_auth(target, 'read leases in') from None
        if not stat.ephemeralOwner:  # readers' parent (shared.py): each reader is a lease
            try:
                readers = client.get_children(path)
            except NoNodeError:
                continue
            pending += [(name, f'{path}/{r}', client.get_async(f'{path}/{r}')) for r in readers]
            continue
        m = LEASE_NAME.match(name)
        leases.append(LeaseNode(
            path=path, name=name, digest=m.group('digest'),
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
