"""Celery settings the compose file adds to the demo app (examples/demoapp.py).

Every container of the app has ``CELERY_CONFIG_MODULE=celeryconfig`` in its
environment and this file as ``/app/celeryconfig.py`` (docker/Dockerfile), so
the worker, the client that publishes, ``celery mutex`` and Flower all load it.
The app's own ``app.conf.update(...)`` still wins where both set a key; this
file only adds what the demo app leaves out.

In your own project these lines go into your app's configuration.
"""
import os

from kombu import Queue

# The task queue as a RabbitMQ quorum queue, declared the same way by every
# process that uses it (a process that declared it as a classic queue would be
# refused: PRECONDITION_FAILED, inequivalent arg 'x-queue-type').
#
# x-delivery-limit: a quorum queue drops (or dead-letters) a message redelivered
# more often than this. The step never lets a waiting message get near it: it
# parks waiters on a quorum park queue of their own, and a message that still
# cycles (ZooKeeper unreachable, mutex_park = False) is republished as a fresh
# copy once the queue counted mutex_republish_after deliveries. The limit must
# stay above mutex_republish_after, or the broker drops the message first.
#
# The queue's exchange is the default direct one: the demo sends no ETA or
# countdown tasks. Celery's native delayed delivery for quorum queues needs a
# topic exchange; with a direct one the worker logs a WARNING at start that ETA
# tasks would block it ("... is a direct exchange ...").
QUEUE = os.environ.get('DEMO_QUEUE', 'mutex-demo')
DELIVERY_LIMIT = 50
task_queues = [
    Queue(QUEUE, queue_arguments={
        'x-queue-type': 'quorum',
        'x-delivery-limit': DELIVERY_LIMIT,
    }),
]

# Deliveries after which a waiting message on a quorum queue is republished as a
# fresh copy instead of requeued (the step's default, written out to go with
# x-delivery-limit above).
mutex_republish_after = 10

# Where `celery -A examples.demoapp mutex list|status` finds ZooKeeper. The
# workers get the same list with --mutex-hosts in docker-compose.yml.
mutex_hosts = 'zk1:2181,zk2:2181,zk3:2181'
