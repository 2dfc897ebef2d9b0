"""The running task's view of its lease: key and fencing token."""
from __future__ import annotations

from typing import Any, Optional

__all__ = ('mutex_lease',)


def mutex_lease(task_or_request: Any) -> Optional[dict]:
    """Return ``{'mutex', 'key', 'path', 'token', 'session', 'timeout'}`` or None.

    Pass the bound task (``self``) or its ``self.request``. ``token`` is the
    lease node's creation zxid: it grows with every grant of any key, so a
    later holder of this key always has a larger one. Send it with your
    writes and have the storage refuse a token lower than one it has seen:
    a holder paused past its session (and so no longer the holder) is then
    refused, which the mutex alone cannot guarantee.
    """
    request = getattr(task_or_request, 'request', task_or_request)
    return getattr(request, 'mutex_lease', None) or None
