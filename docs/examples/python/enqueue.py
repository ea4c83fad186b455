#!/usr/bin/env python3
"""Enqueue a Kairos task from Python with nothing but pika.

Kairos's wire contract (docs/CONTRACT.md) is plain AMQP: publish one
persistent message whose `type` property is the task name. Publish to
`NS.tasks` to run it now, or to `NS.delay` with `x-delay-ms` / `x-run-at`
to run it later. The routing key is the logical queue.

    pip install pika
    python3 enqueue.py --name kairos.sleep --body '{"ms": 100}' --delay-ms 1500

Prints one JSON line: the task id and when the broker confirmed it.
"""
import argparse
import json
import os
import time
import uuid

import pika


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--amqp-url", default=os.environ.get("KAIROS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    p.add_argument("--namespace", default=os.environ.get("KAIROS_NAMESPACE", "kairos"))
    p.add_argument("--queue", default="default", help="logical queue (routing key)")
    p.add_argument("--name", required=True, help="task name, e.g. email.send")
    p.add_argument("--id", default=None, help="task id (default: a new UUID)")
    p.add_argument("--body", default="{}", help="body, sent as UTF-8 bytes")
    p.add_argument("--priority", type=int, default=0, help="0 to 9, higher runs first")
    p.add_argument("--delay-ms", type=int, default=None, help="run this many ms after the scheduler accepts it")
    p.add_argument("--run-at", type=int, default=None, help="run at this Unix time in ms")
    p.add_argument("--max-retries", type=int, default=None)
    p.add_argument("--timeout-ms", type=int, default=None)
    args = p.parse_args()

    headers = {}
    if args.delay_ms is not None:
        headers["x-delay-ms"] = args.delay_ms
    if args.run_at is not None:
        headers["x-run-at"] = args.run_at
    if args.max_retries is not None:
        headers["x-max-retries"] = args.max_retries
    if args.timeout_ms is not None:
        headers["x-timeout-ms"] = args.timeout_ms

    delayed = args.delay_ms is not None or args.run_at is not None
    exchange = f"{args.namespace}.delay" if delayed else f"{args.namespace}.tasks"
    task_id = args.id or str(uuid.uuid4())

    conn = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = conn.channel()
    channel.confirm_delivery()  # basic_publish now raises unless the broker confirms
    sent_at = int(time.time() * 1000)
    channel.basic_publish(
        exchange=exchange,
        routing_key=args.queue,
        body=args.body.encode(),
        properties=pika.BasicProperties(
            type=args.name,
            message_id=task_id,
            priority=args.priority,
            delivery_mode=2,  # persistent
            content_type="application/json",
            headers=headers,
        ),
        mandatory=not delayed,  # an immediate task must reach a queue
    )
    confirmed_at = int(time.time() * 1000)
    conn.close()
    print(json.dumps({"id": task_id, "exchange": exchange, "sent_at": sent_at, "confirmed_at": confirmed_at}))


if __name__ == "__main__":
    main()
