"""The errors the step raises or stores, each naming what was wrong."""
from __future__ import annotations

import click
from celery.exceptions import ImproperlyConfigured

__all__ = ('MutexConfigError', 'MutexKeyError', 'MutexContended', 'MutexTimeout')


class MutexConfigError(ImproperlyConfigured, click.UsageError):
    """A mutex option or worker flag is invalid; raised when the worker starts.

    It is also a ``click.UsageError`` so ``celery worker`` prints it as one
    line (``Error: ...``) and exits with status 2 instead of a traceback.
    """

    def __init__(self, message: str) -> None:
        click.UsageError.__init__(self, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


class MutexKeyError(ValueError):
    """A request's mutex key cannot be built from its arguments.

    The task fails with this error in its result; the message is not requeued,
    because the same arguments would fail the same way on every delivery.
    """


class MutexContended(Exception):
    """Stored as the result of a task skipped because its mutex was held, or
    (``reason``) one that waited past its ``mutex_wait_timeout``."""

    def __init__(self, task: str = '', key: str = '', reason: str = '') -> None:
        super().__init__(*((task, key, reason) if reason else (task, key)))
        self.task = task
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        text = f'mutex for {self.task} is held (key {self.key})'
        return f'{text}: {self.reason}' if self.reason else text


class MutexTimeout(Exception):
    """Stored as the result of a task killed for outliving its ``mutex_timeout``."""

    def __init__(self, task: str = '', timeout: float = 0.0) -> None:
        super().__init__(task, timeout)
        self.task = task
        self.timeout = timeout

    def __str__(self) -> str:
        return f'{self.task} overran its mutex_timeout of {self.timeout:g}s and was killed'
