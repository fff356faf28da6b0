#!/usr/bin/env bash
# Demo: checkpoint a live process to disk, kill it, bring it back with the
# same PID, and show that it carries on where it stopped.
# Run as root on Debian: sudo scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "run as root (ptrace, clone3 set_tid)" >&2; exit 1; fi
command -v gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc libc6-dev >/dev/null; }
cargo build --release -q -p floe-cli
FLOE=$PWD/target/release/floe
work=$(mktemp -d /tmp/floe-demo.XXXXXX)
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

cat > "$work/counter.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(void) {
    size_t n = 64 << 20; unsigned char *mem = malloc(n);
    for (size_t i = 0; i < n; i++) mem[i] = (unsigned char)(i * 131);
    unsigned long sum = 0; for (size_t i = 0; i < n; i += 4096) sum += mem[i];
    for (long tick = 0;; tick++) {
        printf("tick %ld pid %d memsum %lu\n", tick, getpid(), sum); fflush(stdout);
        struct timespec ts = {0, 250000000}; nanosleep(&ts, NULL);
    }
}
C
gcc -O1 -o "$work/counter" "$work/counter.c"
setsid "$work/counter" > "$work/counter.log" 2>&1 < /dev/null &
sleep 1.2
pid=$(pgrep -f "$work/counter" | head -n 1)
echo "== workload running as pid $pid"; tail -n 2 "$work/counter.log"
"$FLOE" check || true
echo "== floe dump -t $pid -D $work/img"
"$FLOE" dump -t "$pid" -D "$work/img"
for _ in $(seq 100); do [ -e /proc/$pid ] || break; sleep 0.05; done
echo "== process is gone: $( [ -e /proc/$pid ] && echo no || echo yes )"
"$FLOE" inspect "$work/img" | head -n 12
echo "== floe restore -D $work/img --restore-detached"
"$FLOE" restore -D "$work/img" --restore-detached
sleep 1.2
echo "== after restore (same pid, counting on):"
tail -n 4 "$work/counter.log"
ls -l /proc/$pid/exe
