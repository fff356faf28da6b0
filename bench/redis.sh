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
BENCH_NAME=redis-bench
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

# ---------------------------------------------------------------- checks ---
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
	echo "redis-bench: redis-server and/or redis-cli not found in PATH; this script installs nothing"
	echo "redis-bench: SKIPPED"
	exit 0
fi
[[ $(id -u) == 0 ]] || die "must run as root (floe dump/restore needs it)"
need_posint REPEAT
[[ $KEYS =~ ^[1-9][0-9]*$ && $VALUE_SIZE =~ ^[1-9][0-9]*$ ]] || die "KEYS/VALUE_SIZE must be positive integers"
need_cmds python3 gcc setsid timeout
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
	cmd=$(proc_cmdline "$1") || return 1
	[[ $comm == redis-server && $cmd == *"127.0.0.1:$PORT"* ]]
}

kill_and_wait() { # PID: kill it if it is still our redis, wait until gone
	kill_ours is_ours "$1" || log "redis-bench: warning: pid $1 still present ${GONE_TIMEOUT_S}s after SIGKILL"
}

cleanup_procs() { # (bench_cleanup, on exit)
	local p
	for p in "${PIDS[@]}"; do
		kill_and_wait "$p"
	done
}

make_work floe-redis
printf 'rep\torder\tours_dump_s\tbase_scan_s\tbase_copy_s\tbase_fsync_s\tbase_bytes\tours_restore_s\tbase_fill_s\tbase_touch_s\tused_memory\trss\trundir\n' >"$RESULTS"

# ----------------------------------------------------------------- build ---
log "redis-bench: building baselines (gcc -O2) into $WORK/bin"
build_c baseline bench/baseline.c
build_c baseline_proc bench/baseline_proc.c
BASELINE="$WORK/bin/baseline"
BASELINE_PROC="$WORK/bin/baseline_proc"
need_floe

# ----------------------------------------------------------------- redis ---
HAVE_DEBUG=0

# start_redis DIR -> R_PID, R_USED, R_RSS, R_FP (fingerprint of the data)
start_redis() {
	local dir=$1
	# redis keeps inherited descriptors: launch closes them first
	launch "$dir" "$dir/redis.log" redis-server --port "$PORT" --bind 127.0.0.1 --save '' \
		--appendonly no --daemonize no --dir "$dir" "${REDIS_EXTRA[@]}"
	R_PID=$LAUNCHED
	PIDS+=("$R_PID")
	local deadline=$((SECONDS + START_TIMEOUT_S))
	until [[ $(cli PING 2>/dev/null) == PONG ]]; do
		kill -0 "$R_PID" 2>/dev/null || die "redis-server exited at start; log: $(tail -n 20 "$dir/redis.log")"
		((SECONDS < deadline)) || die "redis-server not answering PING after ${START_TIMEOUT_S}s"
		sleep 0.05
	done
	is_ours "$R_PID" || die "pid $R_PID does not look like our redis-server ($(proc_cmdline "$R_PID"))"

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

warm() { warm_up $((2 * R_RSS)); }

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
	warm
	baseline_restore "$B_BYTES" "$1"
}

ours_dump() { # DIR -> O_DUMP; redis is gone afterwards
	local dir=$1
	warm
	# shellcheck disable=SC2086
	timed "$dir/dump" "$FLOE" dump -t "$R_PID" -D "$dir/img" --json $FLOE_DUMP_ARGS
	if ((RUN_RC != 0)); then
		if grep -qi 'socket' "$dir/dump.err"; then
			log "redis-bench: floe refused redis's sockets (TCP listener support missing in this build?)"
		fi
		run_failed "floe dump -t $R_PID" "$dir/dump"
	fi
	O_DUMP=$RUN_S
	wait_gone "$R_PID" || die "redis $R_PID still exists ${GONE_TIMEOUT_S}s after floe dump"
}

ours_restore() { # DIR -> O_RESTORE; verifies redis, leaves it running
	local dir=$1
	warm
	# shellcheck disable=SC2086
	timed "$dir/restore" "$FLOE" restore -D "$dir/img" --restore-detached --json $FLOE_RESTORE_ARGS
	((RUN_RC == 0)) || run_failed "floe restore -D $dir/img" "$dir/restore"
	O_RESTORE=$RUN_S
	check_json_pid "$dir/restore.json" "$R_PID"
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
note_load
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
echo "machine: $(uname -r), $(nproc) cpu(s); THP $(thp_mode); work dir fs $(work_fs)"
echo "         load average at start $LOAD0, at end $(load_avg)"
echo "floe:    $FLOE  WARM=$WARM"
echo "redis:   $REDIS_VERSION, $KEYS keys x $VALUE_SIZE B loaded with $LOAD_HOW"
BENCH_LIB="$REPO/bench" python3 - "$RESULTS" "$CRIU_REF_S" <<'EOF'
import csv, json, os, sys
sys.path.insert(0, os.environ["BENCH_LIB"])
from report import med

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
criu = float(sys.argv[2])
f = float

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
