"""Runnable examples of celery-mutex-bootstep: ``make demo`` (``python -m examples.demo``).

Nothing here imports the test harness (``integration/``): what the demo needs to run
a private ZooKeeper and real workers comes from :mod:`celery_mutex_bootstep.testing`.
"""
