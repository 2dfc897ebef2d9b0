"""The namespace probe: may this session create and read leases, and who else may?

Digest credentials are accepted at connect whatever they are; only an
operation tells whether the namespace's ACL lets the worker in. Once per
session the probe creates the session's clock node (``.clock-<session>``,
whose ``setData`` in a batch of creates gives the batch its token), lists the
namespace and reads its ACL. A refusal sets ``leases.access_error`` (guarded
tasks then go back to the broker) and is logged once, not once per task; an
ACL that lets anyone delete leases is a WARNING.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from kazoo.exceptions import NoAuthError, NodeExistsError

__all__ = ('probe_namespace',)

logger = logging.getLogger('celery_mutex_bootstep.lease')


def probe_namespace(leases: Any, session_id: Optional[int]) -> None:
    """Check once per session that we may create and read in the namespace.

    Digest credentials are accepted at connect whatever they are; only an
    operation tells whether the namespace's ACL lets us in. The answer is
    logged once, not once per task.
    """
    path = f'{leases.namespace}/.clock-{session_id or 0:x}'

    def refused(what: str) -> None:
        leases.access_error = (
            f'this worker may not {what} under {leases.namespace} in ZooKeeper (the '
            f'namespace ACL refuses its credentials: check mutex_auth / --mutex-auth)')
        logger.error('mutex: %s; guarded tasks will not run and go back to the '
                     'broker', leases.access_error)

    def listed(result: Any) -> None:
        try:
            result.get_nowait()
        except NoAuthError:
            return refused('list leases')
        except Exception:
            return
        leases.access_error = None
        leases.client.get_acls_async(leases.namespace).rawlink(checked_acl)

    def checked_acl(result: Any) -> None:
        try:
            acls, _ = result.get_nowait()
        except Exception:
            return
        open_ = [a for a in acls if a.id.scheme == 'world' and a.perms & 8]
        if open_:
            logger.warning('mutex: the namespace %s lets anyone delete leases (ACL '
                           'world:anyone); set mutex_auth so the step protects the '
                           'nodes it creates', leases.namespace)

    def created(result: Any) -> None:
        try:
            result.get_nowait()
        except NoAuthError:
            return refused('create leases')
        except NodeExistsError:
            pass
        except Exception:
            return
        if session_id is not None:
            leases._clock = (path, session_id)
        leases.client.get_children_async(leases.namespace).rawlink(listed)

    try:
        leases.client.create_async(path, b'', ephemeral=True, makepath=True).rawlink(created)
    except Exception:
        pass

