"""``celery mutex list``: per key, how many messages wait and the oldest wait.

Where it comes from:

* the workers' ``mutex_leases`` replies: per key, the messages waiting in each
  one's consumer, the parked count it knows and the oldest wait
  (``waiting_keys``; from a worker of an older release, its ``waiting`` list);
* ZooKeeper: the park queues registered under ``<namespace>/.parked``;
* the broker: each registered park queue's message count (a passive
  declare). It replaces the workers' knowledge when the broker answers.

A key's waiting messages are those in the consumers of the workers that
answered plus its parked ones. A message moving between the two (being
parked, unparked, or delivered) may be in neither for a moment. The oldest
wait is the longest any worker reports: parked messages only count there for
the worker that parked them.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .text import cut, duration, table

__all__ = ('KeyWaiting', 'Waiting', 'read_parked', 'count_parked', 'collect', 'waiting')


@dataclass
class KeyWaiting:
    """One key's waiters, across the workers and its park queue."""

    key: str
    mutex: Optional[str] = None
    holders: int = 0
    in_workers: int = 0
    parked: Optional[int] = None
    parked_from: Optional[str] = None      # 'broker' or 'workers'
    oldest_wait: Optional[float] = None
    workers: Dict[str, dict] = field(default_factory=dict)

    @property
    def waiting(self) -> int:
        return self.in_workers + (self.parked or 0)

    def as_json(self) -> dict:
        return {**asdict(self), 'waiting': self.waiting}


@dataclass
class Waiting:
    """What ``celery mutex list`` shows under the leases."""

    keys: List[KeyWaiting]
    parked_error: Optional[str] = None

    def totals(self) -> dict:
        waits = [k.oldest_wait for k in self.keys if k.oldest_wait is not None]
        return {'keys': len(self.keys), 'waiting': sum(k.waiting for k in self.keys),
                'in_workers': sum(k.in_workers for k in self.keys),
                'parked': sum(k.parked or 0 for k in self.keys),
                'oldest_wait': max(waits) if waits else None}

    def as_json(self) -> dict:
        return {**self.totals(), 'parked_error': self.parked_error,
                'by_key': [k.as_json() for k in self.keys]}

    def render(self) -> str:
        lines = []
        if self.parked_error:
            lines.append(f'Parked counts as the workers know them: {self.parked_error}.')
        if not self.keys:
            return '\n'.join(lines + ['Waiting: no message waits for a key.'])
        t = self.totals()
        oldest = ('the oldest for ' + duration(t['oldest_wait']) if t['oldest_wait'] is not None
                  else 'how long they waited is known only to the workers that parked them')
        lines.append(f'Waiting: {t["waiting"]} message(s) for {t["keys"]} key(s), '
                     f'{t["in_workers"]} in the workers\' consumers and {t["parked"]} parked; '
                     f'{oldest}.')
        rows = [[k.key[:12], cut(k.mutex or '?', 48), str(k.holders), str(k.waiting),
                 str(k.in_workers), _parked_text(k), duration(k.oldest_wait)]
                for k in self.keys]
        headers = ('KEY', 'MUTEX', 'HOLDERS', 'WAITING', 'IN WORKERS', 'PARKED', 'OLDEST WAIT')
        lines += ['  ' + line for line in table(headers, rows).splitlines()]
        return '\n'.join(lines)


def _parked_text(k: KeyWaiting) -> str:
    if k.parked is None:
        return '?'
    return f'{k.parked}*' if k.parked_from == 'workers' else str(k.parked)


# --------------------------------------------------------------------------- sources

def read_parked(client: Any, namespace: str, timeout: float) -> Dict[str, dict]:
    """digest -> registration (``queue``, ``paths``, ``queue_type``) of the park
    queues under ``<namespace>/.parked``."""
    from kazoo.exceptions import NoNodeError
    root = f'{namespace}/.parked'
    try:
        children = client.get_children(root)
    except NoNodeError:
        return {}
    pending = [(d, client.get_async(f'{root}/{d}')) for d in sorted(children)]
    found = {}
    for digest, result in pending:
        try:
            info = json.loads(result.get(timeout=timeout)[0] or b'{}')
        except NoNodeError:
            continue  # its line ended while we looked
        except ValueError:
            continue
        if isinstance(info, dict) and info.get('queue'):
            found[digest] = info
    return found


def count_parked(app: Any, parked: Dict[str, dict],
                 timeout: float) -> Tuple[Dict[str, int], Optional[str]]:
    """Messages in each park queue, by a passive declare: counts, and an error
    (None when the broker answered for every queue)."""
    counts: Dict[str, int] = {}
    if not parked:
        return counts, None
    try:
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            channel = connection.channel()
            for digest, info in parked.items():
                try:
                    ok = channel.queue_declare(queue=info['queue'], passive=True)
                    counts[digest] = ok.message_count
                except connection.channel_errors:
                    # Gone (Redis drops an empty list): nothing parked. RabbitMQ
                    # closed the channel for it: go on with a new one.
                    counts[digest] = 0
                    channel = connection.channel()
    except Exception as exc:
        return counts, f'could not count the park queues on the broker ({exc})'
    return counts, None


def _worker_entries(info: dict) -> List[dict]:
    """A worker's per-key entries; an older worker's from its ``waiting`` list."""
    if isinstance(info.get('waiting_keys'), list):
        return info['waiting_keys']
    by_key: Dict[str, dict] = {}
    for held in info.get('waiting') or ():
        entry = by_key.setdefault(held.get('key'), {'key': held.get('key'), 'waiting': 0,
                                                     'parked': None, 'oldest_wait': None})
        entry['waiting'] += 1
        entry['oldest_wait'] = max(entry['oldest_wait'] or 0.0, held.get('waited') or 0.0)
    return list(by_key.values())


def _describe(lease: Any) -> Optional[str]:
    mutex = lease.data.get('mutex') or lease.task
    if not mutex:
        return None
    pairs = ', '.join(f'{k}={v!r}' for k, v in lease.key_values() if v is not None)
    return f'{mutex}[{pairs}]'


def collect(leases: Sequence[Any], replies: Dict[str, dict], counts: Dict[str, int],
            registrations: Optional[Dict[str, dict]] = None) -> List[KeyWaiting]:
    """Merge the workers' replies, the broker's counts, the lease nodes and the
    park queues' registrations."""
    rows: Dict[str, KeyWaiting] = {}
    for name, info in sorted(replies.items()):
        for entry in _worker_entries(info):
            if not entry.get('key'):
                continue
            row = rows.setdefault(entry['key'], KeyWaiting(entry['key']))
            row.mutex = row.mutex or entry.get('mutex')
            row.in_workers += int(entry.get('waiting') or 0)
            parked, oldest = entry.get('parked'), entry.get('oldest_wait')
            if parked is not None:  # each follower counts the same queue: the most
                row.parked, row.parked_from = max(row.parked or 0, parked), 'workers'
            if oldest is not None:
                row.oldest_wait = max(row.oldest_wait or 0.0, oldest)
            row.workers[name] = {'waiting': entry.get('waiting'), 'parked': parked,
                                 'oldest_wait': oldest}
    for digest, count in counts.items():
        if count or digest in rows:
            row = rows.setdefault(digest, KeyWaiting(digest))
            row.parked, row.parked_from = count, 'broker'
    holders = Counter(lease.digest for lease in leases)
    for lease in leases:
        if lease.digest in rows:
            rows[lease.digest].mutex = rows[lease.digest].mutex or _describe(lease)
    for row in rows.values():
        row.holders = holders.get(row.key, 0)
        # The registration names the mutex only (no key values): better than nothing.
        row.mutex = row.mutex or (registrations or {}).get(row.key, {}).get('mutex')
    keep = [r for r in rows.values() if r.waiting or r.parked is None]
    return sorted(keep, key=lambda r: (-(r.oldest_wait or 0.0), -r.waiting, r.key))


def waiting(app: Any, leases: Sequence[Any], replies: Dict[str, dict],
            parked: Dict[str, dict], timeout: float) -> Waiting:
    counts, error = count_parked(app, parked, timeout)
    return Waiting(collect(leases, replies, counts, parked), error)
