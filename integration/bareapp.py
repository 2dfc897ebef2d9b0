"""An app module that never imports celery_mutex_bootstep: what an operator's
``celery -A proj inspect`` may load. Same broker as the scenario's workers."""
import os

from celery import Celery

app = Celery('bareapp', broker=os.environ['TEST_BROKER'])
