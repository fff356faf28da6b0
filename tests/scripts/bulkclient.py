#!/usr/bin/env python3
"""bulkclient.py HOST PORT DIR NBYTES

Client for floe's test of a migrating server whose queues are full: it
talks to tcpecho (which writes back every byte it reads, uppercased) over
ONE connection, sending NBYTES of lowercase text while NOT reading, so
that the server soon blocks writing its echo: its send queue holds data
the client's closed window keeps unsent, its receive queue fills up, and
the client's own sends stall with data in flight.

Writes DIR/stalled once the sender has been blocked for a while, then waits
for DIR/go (the test migrates the server meanwhile); then reads the whole
echo, comparing every byte, while the sender finishes. Writes DIR/result:
"ok bytes=<n>" or "bad <reason>". Any error (reset, EOF, 60 s without
progress) is a "bad" result.
"""
import os
import socket
import sys
import threading
import time

host, port, out, total = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])


def result(text):
    tmp = os.path.join(out, ".result.tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.rename(tmp, os.path.join(out, "result"))


# Lowercase text with a period (4093, prime) that no page size divides.
base = bytes(97 + (i * 7) % 26 for i in range(4093))
data = (base * (total // len(base) + 1))[:total]
expect = data.upper()
sent = 0
send_error = None


def sender(s):
    global sent, send_error
    try:
        view = memoryview(data)
        while sent < total:
            n = s.send(view[sent : sent + 65536])
            sent += n
    except OSError as e:
        send_error = e


try:
    s = socket.create_connection((host, port))
    s.settimeout(60)
    t = threading.Thread(target=sender, args=(s,), daemon=True)
    t.start()
    # Stalled: no progress for 0.5 s (both directions' buffers are full).
    last, still = -1, 0.0
    while still < 0.5:
        time.sleep(0.1)
        still = still + 0.1 if sent == last else 0.0
        last = sent
    with open(os.path.join(out, "stalled"), "w") as f:
        f.write(f"sent={sent}\n")
    while not os.path.exists(os.path.join(out, "go")):
        time.sleep(0.05)
    got = 0
    while got < total:
        chunk = s.recv(1 << 16)
        if not chunk:
            result(f"bad eof after {got} bytes")
            sys.exit(0)
        if chunk != expect[got : got + len(chunk)]:
            k = next(i for i, b in enumerate(chunk) if b != expect[got + i])
            result(f"bad byte {got + k}: got {chunk[k]} want {expect[got + k]}")
            sys.exit(0)
        got += len(chunk)
    t.join(60)
    if send_error is not None or sent != total:
        result(f"bad sender: sent {sent} of {total} ({send_error})")
    else:
        result(f"ok bytes={got}")
except Exception as e:  # noqa: BLE001 - every failure is the test's verdict
    result(f"bad {type(e).__name__}: {e}")
