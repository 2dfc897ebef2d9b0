"""Access to ZooKeeper: digest credentials, ACLs on every node, TLS.

With ``mutex_auth='user:password'`` the session authenticates with the digest
scheme and every node the step creates (the namespace and each lease) gets an
ACL granting all rights to that user alone, so a client without the
credentials can neither read lease data nor list or delete leases (deleting a
child needs DELETE on its parent, the namespace). The password is never
logged or shown in errors.

TLS goes through kazoo's SSL options (``mutex_tls``: ``ca``, ``certfile``,
``keyfile``, ``keyfile_password``, ``verify_certs``, ``check_hostname``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

from kazoo.security import make_digest_acl

from .exceptions import MutexConfigError

__all__ = ('validate_auth', 'validate_tls', 'client_options')

TLS_KEYS = ('ca', 'certfile', 'keyfile', 'keyfile_password', 'verify_certs',
            'check_hostname')


def validate_auth(value: Any, source: str = 'mutex_auth') -> Optional[str]:
    if value is None or value == '':
        return None
    user, colon, password = value.partition(':') if isinstance(value, str) else ('', '', '')
    if not colon or not user or not password:
        raise MutexConfigError(
            f'{source} must be "user:password" for ZooKeeper digest auth '
            f'(the value given is not shown)')
    return value


def validate_tls(value: Any, source: str = 'mutex_tls') -> Optional[Dict[str, Any]]:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise MutexConfigError(f'{source} must be True or a dict of {", ".join(TLS_KEYS)}')
    unknown = sorted(set(value) - set(TLS_KEYS))
    if unknown:
        raise MutexConfigError(f'{source}: unknown option(s) {", ".join(unknown)} '
                               f'(known: {", ".join(TLS_KEYS)})')
    for key in ('ca', 'certfile', 'keyfile'):
        path = value.get(key)
        if path is not None and not os.path.isfile(path):
            raise MutexConfigError(f'{source}: {key} file {path!r} does not exist')
    return dict(value)


def client_options(auth: Optional[str], tls: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Keyword arguments for ``KazooClient`` from validated settings."""
    options: Dict[str, Any] = {}
    if auth:
        user, _, password = auth.partition(':')
        options['auth_data'] = [('digest', auth)]
        options['default_acl'] = [make_digest_acl(user, password, all=True)]
    if tls is not None:
        options['use_ssl'] = True
        options.update(tls)
    return options
