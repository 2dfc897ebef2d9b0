"""A short-lived ZooKeeper session for one command, and its errors."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Optional

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from ..security import client_options
from .exits import unavailable
from .options import Target

# kazoo logs every failed connection attempt; the command reports failures itself.
_kazoo_logger = logging.getLogger('celery_mutex_bootstep.command.kazoo')
_kazoo_logger.setLevel(logging.CRITICAL)


def no_auth(target: Target, what: str) -> Exception:
    given = ('the credentials given are not allowed there' if target.settings.auth
             else 'credentials are needed: pass --mutex-auth user:password or set '
                  'mutex_auth in the app config')
    return unavailable(f'ZooKeeper refused to {what} {target.namespace}: {given}')


def _client(hosts: str, target: Target, timeout: float) -> KazooClient:
    return KazooClient(
        hosts=hosts, timeout=max(timeout, 4.0), logger=_kazoo_logger,
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=1.0),
        command_retry=KazooRetry(max_tries=3, delay=0.1, max_delay=1.0),
        **client_options(target.settings.auth, target.settings.tls))


@contextmanager
def zookeeper(target: Target, timeout: float, hosts: Optional[str] = None) -> Iterator[KazooClient]:
    """A short-lived session; raises a clear error naming the hosts if none answers."""
    hosts = hosts or target.settings.hosts
    client = _client(hosts, target, timeout)
    try:
        client.start(timeout=timeout)
    except Exception as exc:
        _close(client)
        reason = 'no answer' if 'time' in str(exc).lower() else str(exc)
        raise unavailable(
            f'cannot reach ZooKeeper at {hosts} (hosts from {target.hosts_source}) within '
            f'{timeout:g}s ({reason}): is it running, and are the hosts right?') from None
    try:
        yield client
    except (KazooException, KazooTimeoutError) as exc:
        raise unavailable(f'ZooKeeper at {hosts} failed while the command ran: '
                          f'{type(exc).__name__} {exc}'.rstrip()) from None
    finally:
        _close(client)


def _close(client: KazooClient) -> None:
    try:
        client.stop()
        client.close()
    except Exception:
        pass
