"""Celery peer driver: runs W1 (burst of noop tasks, end to end) with the
prefork and the threads pool, keeps the better, then W2(a) (tasks due 2 to
12 s ahead, start lateness) with that pool. Prints one JSON object."""

import datetime
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

W1 = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
W2 = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
KEY = "kb-peer-celery-%d" % os.getpid()
os.environ["PEER_KEY"] = KEY

import tasks  # noqa: E402  (reads PEER_KEY)

r = tasks.r
POOLS = {"prefork": ["--pool", "prefork", "--concurrency", "2"],
         "threads": ["--pool", "threads", "--concurrency", "16"]}


def log(*a):
    print("[celery]", *a, file=sys.stderr, flush=True)


def start_worker(pool):
    cmd = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel", "WARNING",
           "--without-gossip", "--without-mingle", "--without-heartbeat"] + POOLS[pool]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4)  # let it connect and consume
    return p


def stop_worker(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()


def wait_len(key, n, within):
    deadline = time.time() + within
    while time.time() < deadline:
        if r.llen(key) >= n:
            break
        time.sleep(0.01)
    return r.llen(key)


def w1(pool):
    r.delete(KEY + ":done")
    p = start_worker(pool)
    try:
        t0 = time.time()
        for _ in range(W1):
            tasks.noop.delay()
        enq = time.time() - t0
        got = wait_len(KEY + ":done", W1, 60 + W1 / 100)
        last = max(float(x) for x in r.lrange(KEY + ":done", 0, -1)) if got else t0
        return {"pool": pool, "tasks": W1, "ran": got, "enqueue_per_s": W1 / enq,
                "e2e_per_s": got / (last - t0)}
    finally:
        stop_worker(p)
        purge()


def w2(pool):
    r.delete(KEY + ":late")
    p = start_worker(pool)
    try:
        start = int(time.time() * 1000)
        for i in range(W2):
            due = start + 2000 + random.randrange(10000)
            eta = datetime.datetime.fromtimestamp(due / 1000, tz=datetime.timezone.utc)
            tasks.late.apply_async(args=("t%d" % i, due), eta=eta)
        got = wait_len(KEY + ":late", W2, 12 + 30)
        time.sleep(0.5)
        seen = {}
        lat = []
        for x in r.lrange(KEY + ":late", 0, -1):
            tid, ms = x.decode().split()
            seen[tid] = seen.get(tid, 0) + 1
            if seen[tid] == 1:
                lat.append(int(ms))
        lat.sort()
        return {"pool": pool, "tasks": W2, "lateness_ms": pct(lat), "lost": W2 - len(seen),
                "duplicated": sum(1 for c in seen.values() if c > 1), "ran": got}
    finally:
        stop_worker(p)
        purge()


def pct(lat):
    """Nearest-rank percentiles, as kairos-bench computes them."""
    if not lat:
        return {}

    def rank(p):
        return lat[min(len(lat), max(1, math.ceil(p / 100 * len(lat)))) - 1]

    return {"p50": rank(50), "p99": rank(99), "p99.9": rank(99.9), "max": lat[-1]}


def purge():
    try:
        tasks.app.control.purge()
    except Exception:
        pass
    r.delete(KEY + ":done", KEY + ":late")
    with tasks.app.connection_for_write() as conn:
        # The queue and the direct exchange Celery declared under its name.
        for delete in (conn.default_channel.queue_delete, conn.default_channel.exchange_delete):
            try:
                delete(KEY)
            except Exception:
                pass


def main():
    import celery
    out = {"peer": "celery", "version": celery.__version__, "w1": []}
    for pool in POOLS:
        log("W1", pool)
        out["w1"].append(w1(pool))
    best = max(out["w1"], key=lambda x: x["e2e_per_s"])
    log("W2(a) with", best["pool"])
    out["w2a"] = w2(best["pool"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
