"""Reading what test tasks recorded: :mod:`celery_mutex_bootstep.testing.records`, with
the integration tests' Redis database as the default."""
from celery_mutex_bootstep.testing import records as _records
from celery_mutex_bootstep.testing.records import (  # noqa: F401
    Execution, any_overlap, by_key, overlaps)

RECORD_URL = 'redis://127.0.0.1:6379/2'


class Records(_records.Records):
    """One test's record list in Redis (cleared when opened)."""

    def __init__(self, name: str, url: str = RECORD_URL) -> None:
        super().__init__(name, url)
