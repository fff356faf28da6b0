#!/usr/bin/env python3
"""redisclient.py HOST PORT DIR MB

Client for floe's redis live-migration test. Over ONE connection it loads
MB megabytes into redis (8 KiB values, pipelined SETs), writes DIR/ready,
then loops forever: SET a key to a new value, GET a random earlier key and
check the reply against what it last wrote. It never reconnects: any error
(reset, EOF, wrong reply, 30 s without an answer) is fatal and recorded.

On SIGUSR1, every 200 operations and on a fatal error it writes DIR/stats
atomically: count=<ops> max_gap_ms=<x> errors=<k> wrong=<n> last_error=<text>
(max_gap_ms: the longest time between two completed operations after the
load).
"""
import os
import random
import signal
import socket
import sys
import time

host, port, out, mb = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port))
s.settimeout(30)
buf = b""
want_stats = False
count = errors = wrong = 0
max_gap = 0.0
last_error = "none"


def on_usr1(*_):
    global want_stats
    want_stats = True


signal.signal(signal.SIGUSR1, on_usr1)


def write_stats():
    tmp = os.path.join(out, ".stats.tmp")
    with open(tmp, "w") as f:
        f.write(f"count={count} max_gap_ms={max_gap:.3f} errors={errors} wrong={wrong} last_error={last_error}\n")
    os.rename(tmp, os.path.join(out, "stats"))


def cmd(*args):
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


def line():
    global buf
    while b"\r\n" not in buf:
        chunk = s.recv(1 << 16)
        if not chunk:
            raise ConnectionError("eof")
        buf += chunk
    i = buf.index(b"\r\n")
    l, buf = buf[:i], buf[i + 2:]
    return l


def reply():
    global buf
    l = line()
    if l[:1] == b"$":
        n = int(l[1:])
        if n < 0:
            return None
        while len(buf) < n + 2:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("eof")
            buf += chunk
        v, buf = buf[:n], buf[n + 2:]
        return v
    if l[:1] == b"-":
        raise ValueError(l.decode(errors="replace"))
    return l


values = {}
VALUE = 8192
keys = mb * (1 << 20) // VALUE
val = lambda k, g: (b"%d:%d:" % (k, g)).ljust(VALUE, b"x")
batch = 100
for start in range(0, keys, batch):
    s.sendall(b"".join(cmd("SET", "k%d" % k, val(k, 0)) for k in range(start, min(keys, start + batch))))
    for k in range(start, min(keys, start + batch)):
        if reply() != b"+OK":
            raise SystemExit("load failed")
        values[k] = 0
tmp = os.path.join(out, ".ready.tmp")
with open(tmp, "w") as f:
    f.write(f"pid={os.getpid()}\n")
os.rename(tmp, os.path.join(out, "ready"))

last = time.monotonic()
gen = 1
try:
    while True:
        k = random.randrange(keys)
        s.sendall(cmd("SET", "k%d" % k, val(k, gen)))
        if reply() != b"+OK":
            wrong += 1
        values[k] = gen
        gen += 1
        j = random.randrange(keys)
        s.sendall(cmd("GET", "k%d" % j))
        if reply() != val(j, values[j]):
            wrong += 1
        count += 2
        now = time.monotonic()
        max_gap = max(max_gap, (now - last) * 1000)
        last = now
        if want_stats or count % 200 == 0:
            want_stats = False
            write_stats()
        time.sleep(0.002)
except Exception as e:  # fatal: record and stop
    errors += 1
    last_error = type(e).__name__ + ":" + str(e).replace(" ", "_")
    write_stats()
    sys.exit(3)
