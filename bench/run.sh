#!/usr/bin/env bash
# floe dump/restore benchmark against physical baselines. See bench/README.md.
#
#   sudo bench/run.sh                 # 256 MiB and 1 GiB, 3 repeats each
#   SIZES="256" REPEAT=5 bench/run.sh
#   BASELINE_ONLY=1 bench/run.sh      # only the baselines (no floe needed)
#
# Environment:
#   SIZES            sizes in MiB                     (default "256 1024")
#   REPEAT           repeats per size                 (default 3)
#   BASELINE_ONLY    1 = skip floe, measure baselines only
#   FLOE             prebuilt floe binary; if unset, `cargo build --release
#                    -p floe-cli` is run and target/release/floe is used
#   FLOE_DUMP_ARGS   extra args for `floe dump`        (default empty)
#   FLOE_RESTORE_ARGS extra args for `floe restore`    (default empty)
#   WARM             1 = before every timed phase (ours and baseline alike),
#                    fault in and free 2x the size of anonymous memory, so
#                    the phase runs on guest pages the hypervisor has backed
#                    (default 1; 0 = off, see README "Noise")
#   BENCH_TMP        parent of the work dir            (default /var/tmp)
#   KEEP             1 = keep the work dir (images, logs) for inspection
#   RESULTS_TSV      also copy the raw per-repeat results to this file
set -euo pipefail

SIZES=${SIZES:-"256 1024"}
REPEAT=${REPEAT:-3}
BASELINE_ONLY=${BASELINE_ONLY:-0}
FLOE=${FLOE:-}
FLOE_DUMP_ARGS=${FLOE_DUMP_ARGS:-}
FLOE_RESTORE_ARGS=${FLOE_RESTORE_ARGS:-}
WARM=${WARM:-1}
BENCH_TMP=${BENCH_TMP:-/var/tmp}
KEEP=${KEEP:-0}
RESULTS_TSV=${RESULTS_TSV:-}

READY_TIMEOUT_S=120   # memhog filling its memory
GONE_TIMEOUT_S=15     # a killed process disappearing from /proc
CHECK_TIMEOUT_S=60    # restored memhog answering SIGUSR1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_NAME=bench
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

# ---------------------------------------------------------------- checks ---
[[ $(id -u) == 0 ]] || die "must run as root (floe dump/restore needs it)"
need_posint REPEAT
for s in $SIZES; do
	[[ $s =~ ^[1-9][0-9]*$ ]] || die "SIZES must be MiB integers, got '$s'"
done
need_cmds python3 gcc
command -v setsid >/dev/null || die "setsid (util-linux) is required"

# ----------------------------------------------------- state and cleanup ---
WORK=""
MEMHOG_PIDS=() # every memhog (original or restored) we may have to kill

is_our_memhog() { is_work_bin "$1" memhog; } # PID -> true if /proc/PID is a memhog from our work dir

cleanup_procs() { # (bench_cleanup, on exit)
	local p
	for p in "${MEMHOG_PIDS[@]}"; do
		if is_our_memhog "$p"; then
			kill -KILL "$p" 2>/dev/null || true
		fi
	done
}

make_work floe-bench
printf 'size_mib\trep\torder\tours_dump_s\tbase_copy_s\tbase_fsync_s\tours_restore_s\tbase_fill_s\tbase_touch_s\trundir\n' >"$RESULTS"

# ----------------------------------------------------------------- build ---
log "bench: building fixture and baseline (gcc -O2) into $WORK/bin"
build_c memhog tests/fixtures/memhog.c
build_c baseline bench/baseline.c
MEMHOG="$WORK/bin/memhog"
BASELINE="$WORK/bin/baseline"

if [[ $BASELINE_ONLY != 1 ]]; then
	need_floe "use BASELINE_ONLY=1 to measure only the baselines"
fi

# ------------------------------------------------------------- processes ---
# start_memhog MIB DIR -> sets MH_PID MH_ADDR MH_LEN MH_SUM
start_memhog() {
	local mib=$1 dir=$2 ready="$2/ready"
	rm -f -- "$ready" "$ready.check"
	# memhog closes inherited descriptors as well
	launch "$dir" "$dir/memhog.log" "$MEMHOG" "$mib" "$ready"
	local launcher=$LAUNCHED
	MEMHOG_PIDS+=("$launcher")
	wait_ready "$ready" "$launcher" "$READY_TIMEOUT_S" "memhog $mib MiB" "$dir/memhog.log"
	local line
	line=$(cat "$ready")
	MH_PID=$(kv pid "$line")
	MH_ADDR=$(kv addr "$line")
	MH_LEN=$(kv len "$line")
	MH_SUM=$(kv sum "$line")
	[[ -n $MH_PID && -n $MH_ADDR && -n $MH_LEN && -n $MH_SUM ]] || die "bad READYFILE: '$line'"
	[[ $MH_PID == "$launcher" ]] || MEMHOG_PIDS+=("$MH_PID")
	[[ $MH_LEN == $((mib << 20)) ]] || die "memhog reports len=$MH_LEN, expected $((mib << 20))"
	need_session_leader "$MH_PID" memhog
}

kill_and_wait() { # PID  (only if it is still our memhog)
	if is_our_memhog "$1"; then
		kill -KILL "$1" 2>/dev/null || true
	fi
	wait_gone "$1" || log "bench: warning: pid $1 still present ${GONE_TIMEOUT_S}s after SIGKILL (zombie not reaped yet?)"
}

# ---------------------------------------------------------------- phases ---
# Each phase sets its result variable(s).

warm() { warm_up $((2 * MH_LEN)); } # untimed; see WARM

base_dump() { # DIR (uses MH_*) -> B_COPY B_FSYNC
	local out
	warm
	out=$("$BASELINE" dump "$MH_PID" "$MH_ADDR" "$MH_LEN" "$1/baseline.pages") ||
		die "baseline dump failed"
	B_COPY=$(kv copy_s "$out")
	B_FSYNC=$(kv fsync_s "$out")
	[[ -n $B_COPY && -n $B_FSYNC ]] || die "unexpected baseline dump output: '$out'"
}

base_restore() { # DIR -> B_FILL B_TOUCH
	warm
	baseline_restore "$MH_LEN" "$1"
}

ours_dump() { # DIR (uses MH_*) -> O_DUMP ; process is gone afterwards
	local dir=$1
	warm
	mkdir -p "$dir/img"
	# shellcheck disable=SC2086 # FLOE_DUMP_ARGS is a word list on purpose
	timed "$dir/dump" "$FLOE" dump -t "$MH_PID" -D "$dir/img" --json $FLOE_DUMP_ARGS
	((RUN_RC == 0)) || run_failed "floe dump -t $MH_PID" "$dir/dump"
	O_DUMP=$RUN_S
	wait_gone "$MH_PID" ||
		die "pid $MH_PID still exists ${GONE_TIMEOUT_S}s after floe dump (state: $(stat_field "$MH_PID" 1 2>/dev/null))"
}

ours_restore() { # DIR (uses MH_*) -> O_RESTORE ; verifies memory, kills it
	local dir=$1
	warm
	# shellcheck disable=SC2086
	timed "$dir/restore" "$FLOE" restore -D "$dir/img" --restore-detached --json $FLOE_RESTORE_ARGS
	((RUN_RC == 0)) || run_failed "floe restore -D $dir/img" "$dir/restore"
	O_RESTORE=$RUN_S
	MEMHOG_PIDS+=("$MH_PID")

	# --- correctness: same pid, same memory ---
	is_our_memhog "$MH_PID" ||
		die "after restore, pid $MH_PID is not our memhog (cmdline: '$(proc_cmdline "$MH_PID")')"
	check_json_pid "$dir/restore.json" "$MH_PID"
	local check="$dir/ready.check" deadline=$((SECONDS + CHECK_TIMEOUT_S))
	rm -f -- "$check"
	kill -USR1 "$MH_PID"
	wait_answer is_our_memhog "$MH_PID" "$check" "restored memhog $MH_PID" "$dir/memhog.log" "$deadline"
	local sum
	sum=$(kv sum "$(cat "$check")")
	[[ $sum == "$MH_SUM" ]] ||
		die "CORRECTNESS: restored memory differs: checksum $sum, original $MH_SUM (pid $MH_PID, ${MH_LEN} bytes)"
	kill_and_wait "$MH_PID"
}

# ------------------------------------------------------------------- run ---
log "bench: work dir $WORK (same filesystem for baseline file and image)"
note_load
log "bench: sizes [$SIZES] MiB, $REPEAT repeat(s)$([[ $BASELINE_ONLY == 1 ]] && echo ', BASELINE ONLY')"

for mib in $SIZES; do
	for ((rep = 1; rep <= REPEAT; rep++)); do
		dir="$WORK/run-$mib-$rep"
		mkdir -p "$dir"
		O_DUMP=nan O_RESTORE=nan
		if [[ $BASELINE_ONLY == 1 ]]; then
			order=base-only
			start_memhog "$mib" "$dir"
			base_dump "$dir"
			kill_and_wait "$MH_PID"
			base_restore "$dir"
		elif ((rep % 2 == 1)); then
			# baseline first: both dumps see the same process
			order=base-first
			start_memhog "$mib" "$dir"
			base_dump "$dir"
			ours_dump "$dir"
			base_restore "$dir"
			ours_restore "$dir"
		else
			# floe first; floe's dump kills the process, so the baseline
			# dumps a fresh memhog of the same size afterwards
			order=ours-first
			start_memhog "$mib" "$dir"
			ours_dump "$dir"
			ours_restore "$dir"
			start_memhog "$mib" "$dir"
			base_dump "$dir"
			kill_and_wait "$MH_PID"
			base_restore "$dir"
		fi
		rm -rf -- "$dir/img" "$dir/baseline.pages"
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mib" "$rep" "$order" \
			"$O_DUMP" "$B_COPY" "$B_FSYNC" "$O_RESTORE" "$B_FILL" "$B_TOUCH" "$dir" >>"$RESULTS"
		log "bench: $mib MiB rep $rep/$REPEAT ($order): dump ours=${O_DUMP}s base=${B_COPY}+${B_FSYNC}s(fsync)  restore ours=${O_RESTORE}s base=${B_FILL}s (touch ${B_TOUCH}s)"
	done
done

[[ -z $RESULTS_TSV ]] || cp -- "$RESULTS" "$RESULTS_TSV"

# --------------------------------------------------------------- summary ---
echo
machine_info
echo "floe:    $([[ $BASELINE_ONLY == 1 ]] && echo 'not run (BASELINE_ONLY=1)' || echo "$FLOE")  WARM=$WARM"
BENCH_LIB="$REPO/bench" python3 - "$RESULTS" <<'EOF'
import csv, os, sys
sys.path.insert(0, os.environ["BENCH_LIB"])
from report import f, med

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))

def s(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b

def median_row(rs, key):
    ok = [r for r in rs if f(r[key]) is not None]
    if not ok:
        return None
    ok.sort(key=lambda r: f(r[key]))
    return ok[(len(ok) - 1) // 2]  # lower median for even counts

def size_name(mib):
    return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"

sizes = []
for r in rows:
    m = int(r["size_mib"])
    if m not in sizes:
        sizes.append(m)

hdr = ["size", "dump s", "GiB/s", "base s", "ratio", "target",
       "restore s", "GiB/s", "base s", "ratio", "target"]
table, detail, verdicts = [], [], []
for m in sizes:
    rs = [r for r in rows if int(r["size_mib"]) == m]
    gib = m / 1024.0
    od = med(f(r["ours_dump_s"]) for r in rs)
    bd = med((f(r["base_copy_s"]) or 0) + (f(r["base_fsync_s"]) or 0) for r in rs)
    bc = med(f(r["base_copy_s"]) for r in rs)
    bf = med(f(r["base_fsync_s"]) for r in rs)
    orr = med(f(r["ours_restore_s"]) for r in rs)
    br = med(f(r["base_fill_s"]) for r in rs)
    bt = med(f(r["base_touch_s"]) for r in rs)
    rd, rr = ratio(od, bd), ratio(orr, br)
    table.append([size_name(m), s(od), s(od and gib / od, "{:.2f}"), s(bd),
                  s(rd, "{:.2f}x"), "1.3x", s(orr), s(orr and gib / orr, "{:.2f}"),
                  s(br), s(rr, "{:.2f}x"), "1.5x"])
    detail.append([size_name(m), str(len(rs)), s(bc), s(bc and gib / bc, "{:.2f}"), s(bf),
                   s(ratio(od, bc), "{:.2f}x"), s(br and gib / br, "{:.2f}"),
                   s(bt), s(bt and gib / bt, "{:.2f}")])
    if rd is not None:
        verdicts.append(f"{size_name(m)} dump: {rd:.3f}x of baseline, target <= 1.3x: {'PASS' if rd <= 1.3 else 'FAIL'}")
    if rr is not None:
        verdicts.append(f"{size_name(m)} restore: {rr:.3f}x of baseline, target <= 1.5x: {'PASS' if rr <= 1.5 else 'FAIL'}")

def show(h, t):
    w = [max(len(h[i]), *(len(r[i]) for r in t)) for i in range(len(h))]
    print("  ".join(h[i].rjust(w[i]) for i in range(len(h))))
    for r in t:
        print("  ".join(r[i].rjust(w[i]) for i in range(len(h))))

n = max((sum(1 for r in rows if int(r["size_mib"]) == m) for m in sizes), default=0)
print()
print(f"floe dump/restore vs physical baseline (median of {n} run(s); seconds, GiB/s)")
print("  dump base    = process_vm_readv -> write(2) 16 MiB chunks + one fsync")
print("  restore base = fresh anon mmap (4 KiB pages) <- read(2) of the baseline file")
print()
show(hdr, table)
print()
print("baseline details (medians):")
show(["size", "runs", "copy s", "GiB/s", "fsync s", "ours/copy",
      "fill GiB/s", "touch s", "GiB/s"], detail)
if verdicts:
    print()
    for v in verdicts:
        print("  " + v)

def raw(path):
    try:
        return open(path, errors="replace").read().strip() or "(empty)"
    except OSError:
        return "(missing)"

for m in sizes:
    rs = [r for r in rows if int(r["size_mib"]) == m]
    for key, name, fn in (("ours_dump_s", "dump", "dump.json"),
                          ("ours_restore_s", "restore", "restore.json")):
        r = median_row(rs, key)
        if r is None:
            continue
        print()
        print(f"floe {name} --json, {size_name(m)}, median run (rep {r['rep']}, {float(r[key]):.3f} s):")
        print(raw(os.path.join(r["rundir"], fn)))
EOF
