#!/usr/bin/env bash
# floe dump/restore of a real redis-server holding ~200 MB, against same-run
# physical baselines. See bench/README.md, section "redis (redis.sh)".
#
#   sudo bench/redis.sh
#   REPEAT=5 bench/redis.sh
#
# Installs nothing: without redis-server/redis-cli it prints SKIPPED, exits 0.
#
# Environment:
#   REPEAT           repeats                            (default 3)
#   KEYS             keys to load                       (default 200000)
#   VALUE_SIZE       bytes per value                    (default 1000)
#   LOAD             auto = DEBUG POPULATE if DEBUG is available, else
#                    SETs through redis-cli --pipe; pipe = always the latter
#   PORT             TCP port on 127.0.0.1              (default: a free one)
#   FLOE             prebuilt floe binary; if unset, `cargo build --release
#                    -p floe-cli` is run and target/release/floe is used
#   FLOE_DUMP_ARGS / FLOE_RESTORE_ARGS   extra args     (default empty)
#   WARM             1 = before every timed phase fault in and free 2x
#                    redis's RSS (see README "Noise")   (default 1)
#   CRIU_REF_S       CRIU reference figure printed for scale (default 0.22)
#   BENCH_TMP        parent of the work dir             (default /var/tmp)
#   KEEP             1 = keep the work dir
set -euo pipefail

REPEAT=${REPEAT:-3}
KEYS=${KEYS:-200000}
LOAD=${LOAD:-auto}
VALUE_SIZE=${VALUE_SIZE:-1000}
PORT=${PORT:-}
FLOE=${FLOE:-}
FLOE_DUMP_ARGS=${FLOE_DUMP_ARGS:-}
FLOE_RESTORE_ARGS=${FLOE_RESTORE_ARGS:-}
WARM=${WARM:-1}
CRIU_REF_S=${CRIU_REF_S:-0.22}
BENCH_TMP=${BENCH_TMP:-/var/tmp}
KEEP=${KEEP:-0}

START_TIMEOUT_S=20  # redis answering PING after start
LOAD_TIMEOUT_S=120  # loading the data set
IDLE_TIMEOUT_S=10   # redis closing its side of our client connections
GONE_TIMEOUT_S=15   # a killed process disappearing from /proc
CLI_TIMEOUT_S=20    # any single redis-cli call

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '%s\n' "$*" >&2; }
die() {
	log "redis-bench: ERROR: $*"
	exit 1
}
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", a - b }'; }
kv() {
	awk -v k="$1=" '{ for (i = 1; i <= NF; i++) if (index($i, k) == 1) { print substr($i, length(k) + 1); exit } }' <<<"$2"
}

# ---------------------------------------------------------------- checks ---
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
	echo "redis-bench: redis-server and/or redis-cli not found in PATH; this script installs nothing"
	echo "redis-bench: SKIPPED"
	exit 0
fi
[[ $(id -u) == 0 ]] || die "must run as root (floe dump/restore needs it)"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer, got '$REPEAT'"
[[ $KEYS =~ ^[1-9][0-9]*$ && $VALUE_SIZE =~ ^[1-9][0-9]*$ ]] || die "KEYS/VALUE_SIZE must be positive integers"
for c in python3 gcc setsid timeout; do
	command -v "$c" >/dev/null || die "$c is required"
done
REDIS_VERSION=$(redis-server --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')
[[ -n $REDIS_VERSION ]] || die "cannot parse 'redis-server --version': $(redis-server --version)"
# DEBUG is off by default since redis 7 (enable-debug-command); older
# versions do not know the option and allow DEBUG anyway.
REDIS_EXTRA=()
((${REDIS_VERSION%%.*} >= 7)) && REDIS_EXTRA=(--enable-debug-command local)

if [[ -z $PORT ]]; then
	PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ $PORT =~ ^[0-9]+$ ]] || die "bad PORT '$PORT'"

cli() { timeout "$CLI_TIMEOUT_S" redis-cli -h 127.0.0.1 -p "$PORT" "$@"; }

# ----------------------------------------------------- state and cleanup ---
WORK=""
PIDS=()

is_ours() { # PID -> true if /proc/PID is a redis-server on our port
	local cmd comm
	comm=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
	cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
	[[ $comm == redis-server && $cmd == *"127.0.0.1:$PORT"* ]]
}

wait_gone() { # PID -> 0 once /proc/PID is gone, 1 after GONE_TIMEOUT_S
	local i
	for ((i = 0; i < GONE_TIMEOUT_S * 50; i++)); do
		[[ -e /proc/$1 ]] || return 0
		sleep 0.02
	done
	return 1
}

kill_and_wait() { # PID: kill it if it is still our redis, wait until gone
	is_ours "$1" || return 0
	kill -KILL "$1" 2>/dev/null || true
	wait_gone "$1" || log "redis-bench: warning: pid $1 still present ${GONE_TIMEOUT_S}s after SIGKILL"
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	local p
	for p in "${PIDS[@]}"; do
		kill_and_wait "$p"
	done
	if [[ -n $WORK && -d $WORK ]]; then
		if [[ $KEEP == 1 ]]; then
			log "redis-bench: keeping work dir $WORK"
		else
			rm -rf -- "$WORK"
		fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK=$(mktemp -d "$BENCH_TMP/floe-redis.XXXXXX")
mkdir -p "$WORK/bin"
RESULTS="$WORK/results.tsv"
printf 'rep\torder\tours_dump_s\tbase_scan_s\tbase_copy_s\tbase_fsync_s\tbase_bytes\tours_restore_s\tbase_fill_s\tbase_touch_s\tused_memory\trss\trundir\n' >"$RESULTS"

# ----------------------------------------------------------------- build ---
log "redis-bench: building baselines (gcc -O2) into $WORK/bin"
gcc -O2 -Wall -o "$WORK/bin/baseline" "$REPO/bench/baseline.c"
gcc -O2 -Wall -o "$WORK/bin/baseline_proc" "$REPO/bench/baseline_proc.c"
BASELINE="$WORK/bin/baseline"
BASELINE_PROC="$WORK/bin/baseline_proc"
if [[ -z $FLOE ]]; then
	log "redis-bench: cargo build --release -p floe-cli"
	(cd "$REPO" && cargo build --release -p floe-cli) || die "cargo build failed"
	FLOE="${CARGO_TARGET_DIR:-$REPO/target}/release/floe"
fi
[[ -x $FLOE ]] || die "floe binary not found/executable: $FLOE"

# ----------------------------------------------------------------- redis ---
close_inherited_fds() { # in a subshell: close every fd > 2
	local f n
	for f in /proc/$BASHPID/fd/*; do
		n=${f##*/}
		if [[ $n =~ ^[0-9]+$ ]] && ((n > 2)); then
			exec {n}>&- 2>/dev/null || true
		fi
	done
}

HAVE_DEBUG=0

# start_redis DIR -> R_PID, R_USED, R_RSS, R_FP (fingerprint of the data)
start_redis() {
	local dir=$1
	(
		close_inherited_fds
		# redis keeps inherited descriptors: close them first. Session
		# leader, stdin /dev/null, output to a file: no --shell-job needed.
		cd "$dir" && exec setsid redis-server --port "$PORT" --bind 127.0.0.1 --save '' \
			--appendonly no --daemonize no --dir "$dir" "${REDIS_EXTRA[@]}" \
			</dev/null >"$dir/redis.log" 2>&1
	) &
	R_PID=$!
	disown "$R_PID" 2>/dev/null || true
	PIDS+=("$R_PID")
	local deadline=$((SECONDS + START_TIMEOUT_S))
	until [[ $(cli PING 2>/dev/null) == PONG ]]; do
		kill -0 "$R_PID" 2>/dev/null || die "redis-server exited at start; log: $(tail -n 20 "$dir/redis.log")"
		((SECONDS < deadline)) || die "redis-server not answering PING after ${START_TIMEOUT_S}s"
		sleep 0.05
	done
	is_ours "$R_PID" || die "pid $R_PID does not look like our redis-server ($(tr '\0' ' ' <"/proc/$R_PID/cmdline"))"

	# --- load ---
	local t0 out=""
	HAVE_DEBUG=0
	[[ $(cli DEBUG DIGEST 2>&1) =~ ^[0-9a-f]{40}$ ]] && HAVE_DEBUG=1
	t0=$(now)
	if ((HAVE_DEBUG)) && [[ $LOAD != pipe ]]; then
		out=$(timeout "$LOAD_TIMEOUT_S" redis-cli -h 127.0.0.1 -p "$PORT" DEBUG POPULATE "$KEYS" key "$VALUE_SIZE" 2>&1 || true)
	fi
	if [[ $out == OK ]]; then
		LOAD_HOW="DEBUG POPULATE $KEYS key $VALUE_SIZE"
	else
		# DEBUG POPULATE not available: SET key:N <value> through redis-cli --pipe
		LOAD_HOW="redis-cli --pipe, $KEYS SETs"
		python3 - "$KEYS" "$VALUE_SIZE" <<'EOF' | timeout "$LOAD_TIMEOUT_S" redis-cli -h 127.0.0.1 -p "$PORT" --pipe >"$dir/load.log" 2>&1 ||
import sys
keys, size = int(sys.argv[1]), int(sys.argv[2])
out = sys.stdout.buffer
buf = []
for i in range(keys):
    k = b"key:%d" % i
    v = (b"value:%d:" % i).ljust(size, b"x")[:size]
    buf.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v))
    if len(buf) >= 10000:
        out.write(b"".join(buf))
        buf = []
out.write(b"".join(buf))
EOF
			die "loading via redis-cli --pipe failed: $(tail -n 5 "$dir/load.log")"
	fi
	LOAD_S=$(sub "$(now)" "$t0")
	local n
	n=$(cli DBSIZE)
	[[ $n == "$KEYS" ]] || die "after loading, DBSIZE is '$n', expected $KEYS"
	R_FP=$(fingerprint)
	local info
	info=$(cli INFO memory | tr -d '\r')
	R_USED=$(sed -n 's/^used_memory://p' <<<"$info")
	R_RSS=$(sed -n 's/^used_memory_rss://p' <<<"$info")
	wait_idle "$R_PID"
}

# fingerprint -> DEBUG DIGEST of the whole data set, or (without DEBUG) a
# hash of DBSIZE and three values
fingerprint() {
	if ((HAVE_DEBUG)); then
		cli DEBUG DIGEST
	else
		{ cli DBSIZE; cli GET key:0; cli GET "key:$((KEYS / 2))"; cli GET "key:$((KEYS - 1))"; } | md5sum | cut -d' ' -f1
	fi
}

# wait_idle PID: every redis-cli has exited; wait until redis closed its side
# too, so it holds one socket, the listener (no client connections)
wait_idle() {
	local deadline=$((SECONDS + IDLE_TIMEOUT_S)) n
	while :; do
		n=$(find "/proc/$1/fd" -mindepth 1 -maxdepth 1 -lname 'socket:*' 2>/dev/null | wc -l)
		((n == 1)) && return 0
		((SECONDS < deadline)) || die "redis $1 still holds $n sockets (expected only the listener) after ${IDLE_TIMEOUT_S}s"
		sleep 0.02
	done
}

warm() {
	if [[ $WARM == 1 ]]; then
		"$BASELINE" touch $((2 * R_RSS)) >/dev/null || die "warm-up touch failed"
	fi
}

# ---------------------------------------------------------------- phases ---
base_dump() { # DIR (uses R_PID) -> B_SCAN B_COPY B_FSYNC B_BYTES
	local out
	warm
	out=$("$BASELINE_PROC" dump "$R_PID" "$1/baseline.pages") || die "baseline_proc dump failed"
	B_SCAN=$(kv scan_s "$out")
	B_COPY=$(kv copy_s "$out")
	B_FSYNC=$(kv fsync_s "$out")
	B_BYTES=$(kv bytes "$out")
	[[ -n $B_SCAN && -n $B_COPY && -n $B_FSYNC && -n $B_BYTES ]] || die "unexpected baseline_proc output: '$out'"
	echo "$out" >"$1/baseline_dump.txt"
	# the baseline must leave redis running and working
	[[ $(cli PING) == PONG ]] || die "redis not answering PING after the baseline dump"
	wait_idle "$R_PID"
}

base_restore() { # DIR -> B_FILL B_TOUCH
	local out
	warm
	out=$("$BASELINE" restore "$B_BYTES" "$1/baseline.pages") || die "baseline restore failed"
	B_FILL=$(kv fill_s "$out")
	B_TOUCH=$(kv touch_s "$out")
	[[ -n $B_FILL && -n $B_TOUCH ]] || die "unexpected baseline restore output: '$out'"
	rm -f -- "$1/baseline.pages"
}

ours_dump() { # DIR -> O_DUMP; redis is gone afterwards
	local dir=$1 t0 t1 rc=0
	warm
	t0=$(now)
	# shellcheck disable=SC2086
	"$FLOE" dump -t "$R_PID" -D "$dir/img" --json $FLOE_DUMP_ARGS >"$dir/dump.json" 2>"$dir/dump.err" || rc=$?
	t1=$(now)
	if ((rc != 0)); then
		if grep -qi 'socket' "$dir/dump.err"; then
			log "redis-bench: floe refused redis's sockets (TCP listener support missing in this build?)"
		fi
		die "floe dump -t $R_PID failed (rc $rc); stderr:
$(tail -n 30 "$dir/dump.err")"
	fi
	O_DUMP=$(sub "$t1" "$t0")
	wait_gone "$R_PID" || die "redis $R_PID still exists ${GONE_TIMEOUT_S}s after floe dump"
}

ours_restore() { # DIR -> O_RESTORE; verifies redis, leaves it running
	local dir=$1 t0 t1 rc=0 jpid
	warm
	t0=$(now)
	# shellcheck disable=SC2086
	"$FLOE" restore -D "$dir/img" --restore-detached --json $FLOE_RESTORE_ARGS >"$dir/restore.json" 2>"$dir/restore.err" || rc=$?
	t1=$(now)
	((rc == 0)) || die "floe restore -D $dir/img failed (rc $rc); stderr:
$(tail -n 30 "$dir/restore.err")"
	O_RESTORE=$(sub "$t1" "$t0")
	jpid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("pid",""))' "$dir/restore.json" 2>/dev/null || true)
	[[ -z $jpid || $jpid == "$R_PID" ]] || die "floe restore reports pid $jpid, expected $R_PID"
	is_ours "$R_PID" || die "after restore, pid $R_PID is not our redis-server"

	# --- correctness: it serves the same data set ---
	local pong n fp
	pong=$(cli PING 2>&1 || true)
	[[ $pong == PONG ]] || die "restored redis does not answer PING: '$pong'; log: $(tail -n 5 "$dir/redis.log")"
	n=$(cli DBSIZE)
	[[ $n == "$KEYS" ]] || die "CORRECTNESS: restored redis has DBSIZE $n, expected $KEYS"
	fp=$(fingerprint)
	[[ $fp == "$R_FP" ]] || die "CORRECTNESS: restored data set differs (digest $fp, original $R_FP)"
	wait_idle "$R_PID"
}

# ------------------------------------------------------------------- run ---
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${LOAD0%% *}" 'BEGIN { exit !(l > 0.5) }'; then
	log "redis-bench: warning: load average is $LOAD0 -- other work on this machine adds noise"
fi
log "redis-bench: work dir $WORK; redis $REDIS_VERSION on 127.0.0.1:$PORT; $KEYS keys x $VALUE_SIZE B; $REPEAT repeat(s)"

for ((rep = 1; rep <= REPEAT; rep++)); do
	dir="$WORK/run-$rep"
	mkdir -p "$dir"
	start_redis "$dir"
	log "redis-bench: rep $rep: loaded in ${LOAD_S}s ($LOAD_HOW); used_memory $R_USED rss $R_RSS"
	if ((rep % 2 == 1)); then
		order=base-first
		base_dump "$dir"
		ours_dump "$dir"
		base_restore "$dir"
		ours_restore "$dir"
		kill_and_wait "$R_PID"
	else
		# floe first; the baseline then dumps the redis floe restored (same
		# data set, verified)
		order=ours-first
		ours_dump "$dir"
		ours_restore "$dir"
		base_dump "$dir"
		kill_and_wait "$R_PID"
		base_restore "$dir"
	fi
	rm -rf -- "$dir/img" "$dir/baseline.pages"
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$order" "$O_DUMP" "$B_SCAN" "$B_COPY" \
		"$B_FSYNC" "$B_BYTES" "$O_RESTORE" "$B_FILL" "$B_TOUCH" "$R_USED" "$R_RSS" "$dir" >>"$RESULTS"
	log "redis-bench: rep $rep/$REPEAT ($order): dump ours=${O_DUMP}s base=${B_SCAN}+${B_COPY}+${B_FSYNC}s(scan+copy+fsync)  restore ours=${O_RESTORE}s base=${B_FILL}s (verified PING, DBSIZE, digest)"
done

# --------------------------------------------------------------- summary ---
echo
echo "machine: $(uname -r), $(nproc) cpu(s); THP $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo '?'); work dir fs $(stat -f -c %T "$WORK") on $(df --output=source "$WORK" | tail -n1)"
echo "         load average at start $LOAD0, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "floe:    $FLOE  WARM=$WARM"
echo "redis:   $REDIS_VERSION, $KEYS keys x $VALUE_SIZE B loaded with $LOAD_HOW"
python3 - "$RESULTS" "$CRIU_REF_S" <<'EOF'
import csv, json, os, statistics, sys

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
criu = float(sys.argv[2])
f = float

def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None

def s(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)

def load(r, name):
    try:
        return json.load(open(os.path.join(r["rundir"], name)))
    except (OSError, ValueError):
        return {}

def show(h, t):
    w = [max(len(h[i]), *(len(r[i]) for r in t)) for i in range(len(h))]
    print("  ".join(h[i].rjust(w[i]) for i in range(len(h))))
    for r in t:
        print("  ".join(r[i].rjust(w[i]) for i in range(len(h))))

dj = [load(r, "dump.json") for r in rows]
rj = [load(r, "restore.json") for r in rows]
od = med(f(r["ours_dump_s"]) for r in rows)
bd = med(f(r["base_scan_s"]) + f(r["base_copy_s"]) + f(r["base_fsync_s"]) for r in rows)
orr = med(f(r["ours_restore_s"]) for r in rows)
br = med(f(r["base_fill_s"]) for r in rows)
pb = med(j.get("page_bytes") for j in dj)
bb = med(int(r["base_bytes"]) for r in rows)
used = med(int(r["used_memory"]) for r in rows)
rss = med(int(r["rss"]) for r in rows)
MiB = 2**20
rd, rr = od / bd, orr / br

print()
print(f"floe vs physical baseline on redis (median of {len(rows)} run(s); seconds)")
print(f"  data set: used_memory {used / MiB:.1f} MiB, rss {rss / MiB:.1f} MiB; "
      f"floe page_bytes {s(pb and pb / MiB, '{:.1f}')} MiB, baseline bytes {bb / MiB:.1f} MiB")
print("  dump base    = SIGSTOP; PAGEMAP_SCAN of every private mapping -> process_vm_readv -> write(2) + one fsync")
print("  restore base = fresh anon mmap (4 KiB pages) <- read(2) of the baseline file")
print()
show(["", "dump s", "base s", "ratio", "target", "restore s", "base s", "ratio", "target"],
     [["redis", s(od), s(bd), s(rd, "{:.2f}x"), "1.3x", s(orr), s(br), s(rr, "{:.2f}x"), "1.5x"],
      ["CRIU (ref.)", s(criu, "~{:.2f}"), "", "", "", "", "", "", ""]])
print(f"  CRIU row: reference figure for scale (CRIU_REF_S), not measured in this run")
print()
print("baseline details (medians):")
show(["scan s", "copy s", "fsync s", "ours/copy", "fill s", "touch s"],
     [[s(med(f(r["base_scan_s"]) for r in rows), "{:.4f}"), s(med(f(r["base_copy_s"]) for r in rows)),
       s(med(f(r["base_fsync_s"]) for r in rows)), s(od / med(f(r["base_copy_s"]) for r in rows), "{:.2f}x"),
       s(br), s(med(f(r["base_touch_s"]) for r in rows))]])
for side, js in (("dump", dj), ("restore", rj)):
    keys = list(dict.fromkeys(k for j in js for k in j.get("timings", {})))
    if keys:
        print()
        print(f"floe {side} --json timings (ms, medians per phase):")
        show(keys, [[s(med(j.get("timings", {}).get(k) for j in js), "{:.1f}") for k in keys]])
print()
print(f"  redis dump: {rd:.3f}x of baseline, target <= 1.3x: {'PASS' if rd <= 1.3 else 'FAIL'}")
print(f"  redis restore: {rr:.3f}x of baseline, target <= 1.5x: {'PASS' if rr <= 1.5 else 'FAIL'}")
EOF
