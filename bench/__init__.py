"""Benchmarks of celery-mutex-bootstep against the in-pool lock of older libraries.

``python -m bench.run [--quick]`` (or ``make bench``); see bench/README.md.
"""
