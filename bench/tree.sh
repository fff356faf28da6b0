#!/usr/bin/env bash
# floe dump/restore of a process tree: N=1 vs N=16 processes. See
# bench/README.md, section "Process trees (tree.sh)".
#
#   sudo bench/tree.sh
#   REPEAT=5 bench/tree.sh
#
# Environment:
#   COUNTS           tree sizes (processes)            (default "1 16")
#   REPEAT           repeats per size                  (default 3)
#   SHARED_MIB       memory the root fills before forking; every child shares
#                    it copy-on-write                  (default 32)
#   PRIV_MIB         private memory each process fills after the fork
#                                                      (default 8)
#   FLOE             prebuilt floe binary; if unset, `cargo build --release
#                    -p floe-cli` is run and target/release/floe is used
#   FLOE_DUMP_ARGS / FLOE_RESTORE_ARGS   extra args     (default empty)
#   WARM             1 = before every timed phase fault in and free 2x the
#                    tree's memory (see README "Noise") (default 1)
#   BENCH_TMP        parent of the work dir             (default /var/tmp)
#   KEEP             1 = keep the work dir
set -euo pipefail

COUNTS=${COUNTS:-"1 16"}
REPEAT=${REPEAT:-3}
SHARED_MIB=${SHARED_MIB:-32}
PRIV_MIB=${PRIV_MIB:-8}
FLOE=${FLOE:-}
FLOE_DUMP_ARGS=${FLOE_DUMP_ARGS:-}
FLOE_RESTORE_ARGS=${FLOE_RESTORE_ARGS:-}
WARM=${WARM:-1}
BENCH_TMP=${BENCH_TMP:-/var/tmp}
KEEP=${KEEP:-0}

READY_TIMEOUT_S=60  # the tree filling its memory
GONE_TIMEOUT_S=15   # killed processes disappearing from /proc (PID 1 reaps)
CHECK_TIMEOUT_S=30  # restored processes answering SIGUSR1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_NAME=tree-bench
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

# ---------------------------------------------------------------- checks ---
[[ $(id -u) == 0 ]] || die "must run as root (floe dump/restore needs it)"
need_posint REPEAT
for n in $COUNTS; do
	[[ $n =~ ^[1-9][0-9]*$ ]] && ((n <= 1024)) || die "COUNTS must be integers 1..1024, got '$n'"
done
[[ $SHARED_MIB =~ ^[1-9][0-9]*$ && $PRIV_MIB =~ ^[1-9][0-9]*$ ]] || die "SHARED_MIB/PRIV_MIB must be positive integers"
need_cmds python3 gcc setsid pgrep

# ----------------------------------------------------- state and cleanup ---
WORK=""
PIDS=() # every fixture pid (original or restored) we may have to kill

is_ours() { is_work_bin "$1" tree_fixture; } # PID -> true if /proc/PID is a live tree_fixture from our work dir

kill_all() { # PID...  kill those that are still our fixture, wait for them
	kill_ours is_ours "$@" ||
		log "tree-bench: warning: some of pids [${KILLED[*]}] still present ${GONE_TIMEOUT_S}s after SIGKILL"
}

cleanup_procs() { # (bench_cleanup, on exit)
	((${#PIDS[@]} == 0)) || kill_all "${PIDS[@]}"
}

make_work floe-tree
printf 'n\trep\tdump_s\trestore_s\trundir\n' >"$RESULTS"

# ----------------------------------------------------------------- build ---
log "tree-bench: building fixture and baseline (gcc -O2) into $WORK/bin"
build_c tree_fixture tests/fixtures/cowtree.c
build_c baseline bench/baseline.c
FIXTURE="$WORK/bin/tree_fixture"
BASELINE="$WORK/bin/baseline"
need_floe

# ------------------------------------------------------------- processes ---
# start_tree N DIR -> T_ROOT, T_PIDS (array), T_SHARED, T_SUMS (array)
start_tree() {
	local n=$1 dir=$2 ready="$2/ready"
	rm -f -- "$ready" "$ready".check.*
	launch "$dir" "$dir/fixture.log" "$FIXTURE" "$n" "$SHARED_MIB" "$PRIV_MIB" "$ready"
	local launcher=$LAUNCHED
	PIDS+=("$launcher")
	wait_ready "$ready" "$launcher" "$READY_TIMEOUT_S" "tree_fixture N=$n" "$dir/fixture.log"
	local line
	line=$(cat "$ready")
	T_ROOT=$(kv pid "$line")
	T_SHARED=$(kv shared "$line")
	IFS=, read -r -a T_PIDS <<<"$(kv pids "$line")"
	IFS=, read -r -a T_SUMS <<<"$(kv sums "$line")"
	PIDS+=("${T_PIDS[@]}")
	[[ $T_ROOT == "$launcher" ]] || die "ready file names root $T_ROOT, started $launcher"
	((${#T_PIDS[@]} == n && ${#T_SUMS[@]} == n)) || die "bad ready file: '$line'"
	need_session_leader "$T_ROOT" root
}

warm() { warm_up $(((SHARED_MIB + PRIV_MIB * $1) * 2 << 20)); } # N

# verify_tree N DIR: the same pids are back, same tree, same memory
verify_tree() {
	local n=$1 dir=$2 i p ppid st
	local want got
	want=$(printf '%s\n' "${T_PIDS[@]}" | sort -n)
	# every process of the session, as pgrep sees it, must be one of ours
	got=$(pgrep -s "$T_ROOT" | sort -n || true)
	[[ $got == "$want" ]] ||
		die "after restore, session $T_ROOT holds pids [$(echo $got)], expected [$(echo $want)]"
	for ((i = 0; i < n; i++)); do
		p=${T_PIDS[$i]}
		is_ours "$p" || die "after restore, pid $p is not our tree_fixture"
		st=$(stat_field "$p" 1)
		[[ $st != Z && $st != X ]] || die "after restore, pid $p is a zombie"
		if ((i > 0)); then
			ppid=$(stat_field "$p" 2)
			[[ $ppid == "$T_ROOT" ]] || die "after restore, pid $p has parent $ppid, expected $T_ROOT"
		fi
		rm -f -- "$dir/ready.check.$p"
		kill -USR1 "$p"
	done
	local deadline=$((SECONDS + CHECK_TIMEOUT_S)) line
	for ((i = 0; i < n; i++)); do
		p=${T_PIDS[$i]}
		wait_answer is_ours "$p" "$dir/ready.check.$p" "restored pid $p" "$dir/fixture.log" "$deadline"
		line=$(cat "$dir/ready.check.$p")
		[[ $(kv shared "$line") == "$T_SHARED" && $(kv priv "$line") == "${T_SUMS[$i]}" ]] ||
			die "CORRECTNESS: pid $p memory differs after restore: '$line', expected shared=$T_SHARED priv=${T_SUMS[$i]}"
	done
}

# one_run N REP: start, dump (kills), restore, verify, kill
one_run() {
	local n=$1 rep=$2 dir="$WORK/run-$1-$2" dump_s restore_s
	mkdir -p "$dir"
	start_tree "$n" "$dir"

	warm "$n"
	# shellcheck disable=SC2086
	timed "$dir/dump" "$FLOE" dump -t "$T_ROOT" -D "$dir/img" --json $FLOE_DUMP_ARGS
	((RUN_RC == 0)) || run_failed "floe dump -t $T_ROOT (N=$n)" "$dir/dump"
	dump_s=$RUN_S
	wait_all_gone "${T_PIDS[@]}" || die "N=$n: pids still exist ${GONE_TIMEOUT_S}s after floe dump"

	warm "$n"
	# shellcheck disable=SC2086
	timed "$dir/restore" "$FLOE" restore -D "$dir/img" --restore-detached --json $FLOE_RESTORE_ARGS
	((RUN_RC == 0)) || run_failed "floe restore -D $dir/img (N=$n)" "$dir/restore"
	restore_s=$RUN_S
	check_json_pid "$dir/restore.json" "$T_ROOT"

	verify_tree "$n" "$dir"
	kill_all "${T_PIDS[@]}"
	rm -rf -- "$dir/img"
	printf '%s\t%s\t%s\t%s\t%s\n' "$n" "$rep" "$dump_s" "$restore_s" "$dir" >>"$RESULTS"
	log "tree-bench: N=$n rep $rep/$REPEAT: dump ${dump_s}s restore ${restore_s}s (verified $n pids, memory checksums)"
}

# ------------------------------------------------------------------- run ---
note_load
log "tree-bench: work dir $WORK; N in [$COUNTS], $REPEAT repeat(s), shared ${SHARED_MIB} MiB + ${PRIV_MIB} MiB per process"

read -r -a counts <<<"$COUNTS"
for ((rep = 1; rep <= REPEAT; rep++)); do
	# alternate the order of the sizes between repeats
	if ((rep % 2 == 1)); then order=("${counts[@]}"); else order=($(printf '%s\n' "${counts[@]}" | tac)); fi
	for n in "${order[@]}"; do
		one_run "$n" "$rep"
	done
done

# --------------------------------------------------------------- summary ---
echo
echo "machine: $(uname -r), $(nproc) cpu(s); load average at start $LOAD0, at end $(load_avg)"
echo "floe:    $FLOE  WARM=$WARM"
echo "tree:    root fills ${SHARED_MIB} MiB, forks N-1 children sharing it copy-on-write; every process then fills ${PRIV_MIB} MiB of its own"
BENCH_LIB="$REPO/bench" python3 - "$RESULTS" <<'EOF'
import csv, json, os, sys
sys.path.insert(0, os.environ["BENCH_LIB"])
from report import med

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
ns = []
for r in rows:
    if int(r["n"]) not in ns:
        ns.append(int(r["n"]))
ns.sort()

def load(r, name):
    try:
        return json.load(open(os.path.join(r["rundir"], name)))
    except (OSError, ValueError):
        return {}

def s(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)

res = {}
for n in ns:
    rs = [r for r in rows if int(r["n"]) == n]
    dj = [load(r, "dump.json") for r in rs]
    rj = [load(r, "restore.json") for r in rs]
    res[n] = dict(
        runs=len(rs),
        dump=med(float(r["dump_s"]) for r in rs),
        restore=med(float(r["restore_s"]) for r in rs),
        dpages=med(j.get("page_bytes") for j in dj),
        rpages=med(j.get("page_bytes") for j in rj),
        dphase={k: med(j.get("timings", {}).get(k) for j in dj)
                for k in dict.fromkeys(k for j in dj for k in j.get("timings", {}))},
        rphase={k: med(j.get("timings", {}).get(k) for j in rj)
                for k in dict.fromkeys(k for j in rj for k in j.get("timings", {}))},
    )

def show(h, t):
    w = [max(len(h[i]), *(len(r[i]) for r in t)) for i in range(len(h))]
    print("  ".join(h[i].rjust(w[i]) for i in range(len(h))))
    for r in t:
        print("  ".join(r[i].rjust(w[i]) for i in range(len(h))))

mib = lambda b: None if b is None else b / 2**20
print()
print(f"floe dump/restore of a process tree (median of {max(v['runs'] for v in res.values())} run(s); wall time of the CLI)")
print()
show(["procs", "dump s", "restore s", "dump page MiB", "restore page MiB", "dump ms/proc", "restore ms/proc"],
     [[str(n), s(v["dump"]), s(v["restore"]), s(mib(v["dpages"]), "{:.1f}"), s(mib(v["rpages"]), "{:.1f}"),
       s(v["dump"] and v["dump"] * 1000 / n, "{:.1f}"), s(v["restore"] and v["restore"] * 1000 / n, "{:.1f}")]
      for n, v in res.items()])

for side, key in (("dump", "dphase"), ("restore", "rphase")):
    keys = list(dict.fromkeys(k for v in res.values() for k in v[key]))
    if not keys:
        continue
    print()
    print(f"floe {side} --json timings (ms, medians per phase):")
    show(["procs"] + keys, [[str(n)] + [s(v[key].get(k), "{:.1f}") for k in keys] for n, v in res.items()])

if len(ns) >= 2:
    lo, hi = ns[0], ns[-1]
    a, b = res[lo], res[hi]
    print()
    bytes_ratio = (b["dpages"] / a["dpages"]) if a["dpages"] and b["dpages"] else None
    for side in ("dump", "restore"):
        if a[side] and b[side]:
            r = b[side] / a[side]
            per = (b[side] - a[side]) * 1000 / (hi - lo)
            base = "one process" if lo == 1 else f"a {lo}-process tree"
            print(f"  {hi}-process tree {side}: {r:.1f}x {base} (target << {hi // lo}x); "
                  f"+{per:.1f} ms per extra process")
    if bytes_ratio:
        print(f"  (page bytes in the image: {bytes_ratio:.2f}x -- the shared pre-fork memory is stored once)")
EOF
