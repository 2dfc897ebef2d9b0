"""Real ``celery worker`` processes for the integration tests and the benchmarks:
:mod:`celery_mutex_bootstep.testing.workers` with the repository root on the workers'
PYTHONPATH, so that ``-A integration.someapp`` imports."""
import os

from celery_mutex_bootstep.testing import workers as _workers
from celery_mutex_bootstep.testing.workers import WorkerError, WorkerProcess  # noqa: F401

__all__ = ['REPO_ROOT', 'WorkerError', 'WorkerProcess', 'start_worker', 'worker_env']

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(env=None):
    """os.environ + *env*, with the repository root first on PYTHONPATH."""
    return _workers.worker_env(env, pythonpath=[REPO_ROOT])


def start_worker(app_module, **kwargs):
    """:func:`celery_mutex_bootstep.testing.workers.start_worker` with the repository
    root on PYTHONPATH."""
    return _workers.start_worker(app_module, pythonpath=[REPO_ROOT], **kwargs)
