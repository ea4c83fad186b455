"""Celery tasks for the peer benchmark: a noop that notes when it ran, and
a task that notes how late it started. Both write to Redis, where the
driver (bench.py) reads them; that write is the only work they do."""

import os
import time

import redis
from celery import Celery

BROKER = os.environ.get("KAIROS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//").replace("%2f", "")
REDIS = os.environ.get("KAIROS_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY = os.environ.get("PEER_KEY", "kb-peer-celery")

app = Celery("kbpeer", broker=BROKER)
app.conf.update(
    task_default_queue=KEY,
    # Persistent messages, as Kairos and the raw baseline publish them.
    task_default_delivery_mode="persistent",
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
r = redis.Redis.from_url(REDIS)


@app.task(name="peer.noop")
def noop():
    r.rpush(KEY + ":done", time.time())


@app.task(name="peer.late")
def late(task_id, due_ms):
    r.rpush(KEY + ":late", "%s %d" % (task_id, int(time.time() * 1000) - due_ms))
