#!/usr/bin/env bash
# Incremental pre-dumps and dirty-page trackers (uffd, hash). See
# bench/README.md, section "Incremental pre-dumps (incremental.sh)".
#
#   sudo bench/incremental.sh
#   REPEAT=5 bench/incremental.sh
#   TRACKERS=uffd PERCENTS="1" REPEAT=1 bench/incremental.sh
#
# Environment:
#   MIB              memory of the fixture in MiB       (default 1024)
#   PERCENTS         dirty percentages                  (default "1 10 100")
#   TRACKERS         dirty trackers                     (default "uffd hash")
#   REPEAT           repeats per tracker and percentage (default 3)
#   SWEEPS           steady-writer sweeps per mode and state (default 3)
#   STRACE           1 = measure the uffd scan directly: one extra
#                    pre-dump per run under `strace -T -e ioctl` (timings of
#                    that pre-dump are not used)       (default 1)
#   FINAL_DUMP       1 = end each run with an incremental `floe dump`
#                    (kills the fixture)                (default 1)
#   SLOWDOWN         1 = measure the workload slowdown  (default 1)
#   SETTLE_S         slowdown: seconds to wait after a pre-dump before the
#                    sweeps (lets writeback and free page reporting of floe's
#                    buffers pass; write protection stays armed) (default 2)
#   UNIT_SCAN        1 = also run the engine's ignored unit benchmark
#                    track_uffd_scan_1gib (needs cargo; default 1 unless
#                    FLOE is set)
#   FLOE             prebuilt floe binary; if unset, `cargo build --release
#                    -p floe-cli` is run and target/release/floe is used
#   WARM             1 = before every timed floe run fault in and free 2x
#                    MIB of anonymous memory (see README "Noise") (default 1)
#   BENCH_TMP        parent of the work dir             (default /var/tmp)
#   KEEP             1 = keep the work dir (JSON, logs, strace output; the
#                    images are deleted after each run anyway)
#   RESULTS_TSV      also copy the raw per-phase results to this file
set -euo pipefail

MIB=${MIB:-1024}
PERCENTS=${PERCENTS:-"1 10 100"}
TRACKERS=${TRACKERS:-"uffd hash"}
REPEAT=${REPEAT:-3}
SWEEPS=${SWEEPS:-3}
STRACE=${STRACE:-1}
FINAL_DUMP=${FINAL_DUMP:-1}
SLOWDOWN=${SLOWDOWN:-1}
SETTLE_S=${SETTLE_S:-2}
FLOE=${FLOE:-}
UNIT_SCAN=${UNIT_SCAN:-$([[ -z $FLOE ]] && echo 1 || echo 0)}
WARM=${WARM:-1}
BENCH_TMP=${BENCH_TMP:-/var/tmp}
KEEP=${KEEP:-0}
RESULTS_TSV=${RESULTS_TSV:-}

READY_TIMEOUT_S=120 # the fixture filling its memory
CMD_TIMEOUT_S=120   # a fixture command (a sweep takes < 1 s, 10 ms polling)
GONE_TIMEOUT_S=15   # a killed process disappearing from /proc (PID 1 reaps)
FLOE_TIMEOUT_S=300  # one floe run
HOLDER_TIMEOUT_S=10 # a floe-track holder exiting after its process died

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_NAME=incremental-bench
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

# ---------------------------------------------------------------- checks ---
[[ $(id -u) == 0 ]] || die "must run as root (floe needs it)"
need_posint MIB REPEAT SWEEPS
[[ $SETTLE_S =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "SETTLE_S must be a number of seconds, got '$SETTLE_S'"
for p in $PERCENTS; do
	[[ $p =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v p="$p" 'BEGIN { exit !(p > 0 && p <= 100) }' ||
		die "PERCENTS must be numbers in (0, 100], got '$p'"
done
for t in $TRACKERS; do
	[[ $t == uffd || $t == hash ]] || die "TRACKERS must be uffd and/or hash, got '$t'"
done
need_cmds python3 gcc setsid timeout
if [[ $STRACE == 1 && " $TRACKERS " == *" uffd "* ]]; then
	command -v strace >/dev/null || die "strace is required for STRACE=1 (or run with STRACE=0)"
fi

# ----------------------------------------------------- state and cleanup ---
WORK=""
FX_PIDS=() # every fixture we started (killed on exit)

is_our_fixture() { is_work_bin "$1" dirtier; } # PID -> true if /proc/PID is a dirtier from our work dir

# holders_of PID -> pids of live floe-track holders whose pidfd refers to PID
holders_of() {
	local d h f
	for d in /proc/[0-9]*; do
		h=${d#/proc/}
		[[ $(cat "$d/comm" 2>/dev/null) == floe-track ]] || continue
		for f in "$d"/fdinfo/*; do
			if grep -qx "Pid:[[:space:]]*$1" "$f" 2>/dev/null; then
				echo "$h"
				break
			fi
		done
	done
}

# kill_fixture PID: SIGKILL it (if still our fixture), wait until it is gone,
# then make sure its floe-track holders are gone too (they exit by themselves
# when the tracked process exits; killed by pid after HOLDER_TIMEOUT_S).
kill_fixture() {
	local pid=$1 h holders
	holders=$(holders_of "$pid")
	if is_our_fixture "$pid"; then
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait_gone "$pid" || log "incremental-bench: warning: pid $pid still present ${GONE_TIMEOUT_S}s after SIGKILL"
	for h in $holders; do
		if ! wait_gone "$h" "$HOLDER_TIMEOUT_S"; then
			if [[ $(cat "/proc/$h/comm" 2>/dev/null) == floe-track && $(stat_field "$h" 1 2>/dev/null) != Z ]]; then
				log "incremental-bench: warning: holder $h of pid $pid still running; killing it"
				kill -KILL "$h" 2>/dev/null || true
			fi
		fi
	done
}

cleanup_procs() { # (bench_cleanup, on exit)
	local p
	for p in "${FX_PIDS[@]}"; do
		if is_our_fixture "$p" || [[ -n $(holders_of "$p") ]]; then
			kill_fixture "$p"
		fi
	done
}

make_work floe-incr
SLOW="$WORK/slowdown.tsv"
UNIT_OUT="$WORK/unit_scan.txt"
printf 'tracker\tp\trep\tphase\tfreeze_ms\tcollect_ms\tmemory_ms\tcommit_ms\tfrozen_ms\ttotal_ms\tpage_bytes\treused_pages\twall_s\tscan_ms\tscan_ioctls\tdirty_pages\tdirty_ns_per_page\trundir\n' >"$RESULTS"
printf 'tracker\tmode\tstate\tsample\tns_per_page\n' >"$SLOW"

# ----------------------------------------------------------------- build ---
log "incremental-bench: building fixture and baseline (gcc -O2) into $WORK/bin"
build_c dirtier bench/dirtier.c -lm
build_c baseline bench/baseline.c
DIRTIER="$WORK/bin/dirtier"
BASELINE="$WORK/bin/baseline"
need_floe

# JSON of one floe run -> one TSV fragment of its report
cat >"$WORK/bin/jrow.py" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    t = r["timings"]
    vals = [t["freeze_ms"], t["collect_ms"], t["memory_ms"], t["commit_ms"], t["frozen_ms"],
            t["total_ms"], r["page_bytes"], r["reused_pages"]]
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(f"bad floe JSON {sys.argv[1]}: {e}")
print("\t".join(str(v) for v in vals))
EOF

# strace -T output of a pre-dump -> "scan_ms n_ioctls": the PAGEMAP_SCAN
# ioctls the uffd tracker issues on the pagemap it opens right after fetching
# the tracker from its holder (connect to @floe-track-PID), up to the next
# openat (the page copy opens pagemap again for its own, untracked scans).
cat >"$WORK/bin/stscan.py" <<'EOF'
import re, sys
pid = sys.argv[2]
lines = open(sys.argv[1], errors="replace").read().splitlines()
state, fd, total, n = 0, None, 0.0, 0
for l in lines:
    if state == 0:
        if l.startswith("connect(") and f'"floe-track-{pid}"' in l:
            state = 1
    elif state == 1:
        if l.startswith("openat(") and f'"/proc/{pid}/pagemap"' in l:
            m = re.search(r"\) = (\d+)", l)
            if not m:
                break
            fd, state = m.group(1), 2
    elif state == 2:
        if l.startswith("openat("):
            break
        if l.startswith(f"ioctl({fd}<") and ("0x66, 0x10" in l or "PAGEMAP_SCAN" in l):
            m = re.search(r"<(\d+\.\d+)>\s*$", l)
            if m:
                total += float(m.group(1))
                n += 1
if n == 0:
    print("nan 0")
else:
    print(f"{total * 1000:.3f} {n}")
EOF

# ------------------------------------------------------------- processes ---
# start_fixture DIR -> FX_PID FX_DIR FX_SEQ FX_PAGES
start_fixture() {
	local dir=$1
	rm -f -- "$dir/ready" "$dir/ctl" "$dir/result"
	launch "$dir" "$dir/dirtier.log" "$DIRTIER" "$MIB" "$dir"
	local launcher=$LAUNCHED
	FX_PIDS+=("$launcher")
	wait_ready "$dir/ready" "$launcher" "$READY_TIMEOUT_S" dirtier "$dir/dirtier.log"
	local line
	line=$(cat "$dir/ready")
	FX_PID=$(kv pid "$line")
	FX_PAGES=$(kv pages "$line")
	[[ -n $FX_PID && -n $FX_PAGES ]] || die "bad ready file: '$line'"
	[[ $FX_PID == "$launcher" ]] || FX_PIDS+=("$FX_PID")
	[[ $(kv len "$line") == $((MIB << 20)) ]] || die "dirtier reports '$line', expected len=$((MIB << 20))"
	need_session_leader "$FX_PID" dirtier
	FX_DIR=$dir
	FX_SEQ=0
}

# fx CMD [ARG] -> FX_NS_PER_PAGE FX_K (the fixture's report)
fx() {
	FX_SEQ=$((FX_SEQ + 1))
	printf '%s %s %s\n' "$FX_SEQ" "$1" "${2:-}" >"$FX_DIR/ctl.tmp"
	mv -f -- "$FX_DIR/ctl.tmp" "$FX_DIR/ctl"
	local deadline=$((SECONDS + CMD_TIMEOUT_S)) line=""
	while :; do
		line=$(cat "$FX_DIR/result" 2>/dev/null || true)
		[[ $(kv seq "$line") == "$FX_SEQ" ]] && break
		is_our_fixture "$FX_PID" || die "dirtier $FX_PID died during '$1 ${2:-}'; log: $(tail -n 5 "$FX_DIR/dirtier.log")"
		((SECONDS < deadline)) || die "dirtier did not answer '$1 ${2:-}' within ${CMD_TIMEOUT_S}s"
		sleep 0.005
	done
	[[ -z $(kv error "$line") ]] || die "dirtier refused '$1 ${2:-}': $line"
	FX_NS_PER_PAGE=$(kv ns_per_page "$line")
	FX_K=$(kv pages "$line")
}

warm() { warm_up $((2 * (MIB << 20))); } # untimed; see WARM

# floe_run KIND IDX PARENT TRACKER STRACE_OUT -> F_ROW F_WALL; KIND is
# pre-dump or dump, images in $FX_DIR/img/IDX, parent ../PARENT (empty: none)
floe_run() {
	local kind=$1 idx=$2 parent=$3 tracker=$4 st=$5
	local img="$FX_DIR/img/$idx" out="$FX_DIR/$kind.$idx"
	local args=("$kind" -t "$FX_PID" -D "$img" --dirty-tracker "$tracker" --json)
	[[ -z $parent ]] || args+=(--prev-images-dir "../$parent")
	[[ $kind == pre-dump || -n $parent ]] || args+=(--track-mem)
	local pre=(timeout --foreground -k 10 "$FLOE_TIMEOUT_S")
	[[ -z $st ]] || pre+=(strace -o "$st" -T -y -e trace=ioctl,openat,connect)
	timed "$out" "${pre[@]}" "$FLOE" "${args[@]}"
	((RUN_RC == 0)) || run_failed "floe ${args[*]}" "$out"
	F_WALL=$RUN_S
	F_ROW=$(python3 "$WORK/bin/jrow.py" "$out.json") || die "floe ${args[*]}: unreadable JSON: $(head -c 2000 "$out.json")"
}

# record TRACKER P REP PHASE SCAN_MS SCAN_N DIRTY_K DIRTY_NS
record() {
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$F_ROW" "$F_WALL" \
		"$5" "$6" "$7" "$8" "$FX_DIR" >>"$RESULTS"
}

# ---------------------------------------------------------------- phases ---
# One run: fixture; pre-dump 0 (full); dirty P%; pre-dump 1 (incremental,
# the measured one); pre-dump 2 with nothing dirtied; [uffd, STRACE=1: dirty
# P%, pre-dump 3 under strace; pre-dump 4 with nothing dirtied under strace];
# [FINAL_DUMP=1: dirty P%, incremental floe dump, which kills the fixture].
run_one() {
	local tracker=$1 p=$2 rep=$3
	local dir="$WORK/run-$tracker-$p-$rep"
	mkdir -p "$dir/img"
	start_fixture "$dir"
	local k ns last=2 s

	warm
	floe_run pre-dump 0 "" "$tracker" ""
	record "$tracker" "$p" "$rep" full nan 0 0 nan

	fx dirty "$p"
	k=$FX_K ns=$FX_NS_PER_PAGE
	warm
	floe_run pre-dump 1 0 "$tracker" ""
	record "$tracker" "$p" "$rep" inc nan 0 "$k" "$ns"

	warm
	floe_run pre-dump 2 1 "$tracker" ""
	record "$tracker" "$p" "$rep" zero nan 0 0 nan

	if [[ $tracker == uffd && $STRACE == 1 ]]; then
		fx dirty "$p"
		k=$FX_K ns=$FX_NS_PER_PAGE
		floe_run pre-dump 3 2 "$tracker" "$dir/strace.3"
		read -r s n < <(python3 "$WORK/bin/stscan.py" "$dir/strace.3" "$FX_PID")
		record "$tracker" "$p" "$rep" strace-inc "$s" "$n" "$k" "$ns"
		floe_run pre-dump 4 3 "$tracker" "$dir/strace.4"
		read -r s n < <(python3 "$WORK/bin/stscan.py" "$dir/strace.4" "$FX_PID")
		record "$tracker" "$p" "$rep" strace-zero "$s" "$n" 0 nan
		last=4
	fi

	if [[ $FINAL_DUMP == 1 ]]; then
		fx dirty "$p"
		k=$FX_K ns=$FX_NS_PER_PAGE
		warm
		floe_run dump final "$last" "$tracker" ""
		record "$tracker" "$p" "$rep" final nan 0 "$k" "$ns"
		wait_gone "$FX_PID" || die "pid $FX_PID still exists ${GONE_TIMEOUT_S}s after floe dump"
	fi
	kill_fixture "$FX_PID"
	rm -rf -- "$dir/img"
	log "incremental-bench: $tracker P=$p% rep $rep done"
}

# Workload slowdown: the fixture's sweep speed untracked, then right after
# each pre-dump (first write to each page since the tracker re-armed; the
# pre-dump of the previous sweep's pages re-protects them) and a second sweep
# after it (pages no longer protected). Under the hash tracker nothing is
# armed: its first-write row is the control for after-effects of a pre-dump.
run_slowdown() {
	local tracker=$1
	local dir="$WORK/slow-$tracker" mode i idx=0
	mkdir -p "$dir/img"
	start_fixture "$dir"
	sleep "$SETTLE_S"
	for mode in word page; do
		fx sweep "$mode" # not recorded: first pass after the fill
		for ((i = 1; i <= SWEEPS; i++)); do
			fx sweep "$mode"
			printf '%s\t%s\tuntracked\t%s\t%s\n' "$tracker" "$mode" "$i" "$FX_NS_PER_PAGE" >>"$SLOW"
		done
	done
	floe_run pre-dump 0 "" "$tracker" ""
	for mode in word page; do
		for ((i = 1; i <= SWEEPS; i++)); do
			if ((idx > 0)); then
				floe_run pre-dump "$idx" $((idx - 1)) "$tracker" ""
			fi
			idx=$((idx + 1))
			sleep "$SETTLE_S"
			fx sweep "$mode"
			printf '%s\t%s\tfirst-write\t%s\t%s\n' "$tracker" "$mode" "$i" "$FX_NS_PER_PAGE" >>"$SLOW"
			fx sweep "$mode"
			printf '%s\t%s\tsecond-write\t%s\t%s\n' "$tracker" "$mode" "$i" "$FX_NS_PER_PAGE" >>"$SLOW"
		done
	done
	kill_fixture "$FX_PID"
	rm -rf -- "$dir/img"
	log "incremental-bench: $tracker slowdown done"
}

# ------------------------------------------------------------------- run ---
log "incremental-bench: work dir $WORK"
note_load
log "incremental-bench: $MIB MiB, trackers [$TRACKERS], P [$PERCENTS] %, $REPEAT repeat(s)"

# shellcheck disable=SC2206 # word lists on purpose
TLIST=($TRACKERS) PLIST=($PERCENTS)
for ((rep = 1; rep <= REPEAT; rep++)); do
	# alternate the order between repeats (ordering effects: page cache, allocator)
	if ((rep % 2 == 1)); then
		tl=("${TLIST[@]}") pl=("${PLIST[@]}")
	else
		tl=() pl=()
		for ((i = ${#TLIST[@]} - 1; i >= 0; i--)); do tl+=("${TLIST[i]}"); done
		for ((i = ${#PLIST[@]} - 1; i >= 0; i--)); do pl+=("${PLIST[i]}"); done
	fi
	for t in "${tl[@]}"; do
		for p in "${pl[@]}"; do
			run_one "$t" "$p" "$rep"
		done
	done
done
if [[ $SLOWDOWN == 1 ]]; then
	for t in "${TLIST[@]}"; do
		run_slowdown "$t"
	done
fi
if [[ $UNIT_SCAN == 1 ]]; then
	log "incremental-bench: cargo test --release -p floe-engine track_uffd_scan_1gib -- --ignored --nocapture"
	(cd "$REPO" && timeout -k 10 900 cargo test --release -p floe-engine track_uffd_scan_1gib -- --ignored --nocapture) \
		>"$UNIT_OUT" 2>&1 || log "incremental-bench: warning: unit scan benchmark failed (see below)"
fi

[[ -z $RESULTS_TSV ]] || cp -- "$RESULTS" "$RESULTS_TSV"

# --------------------------------------------------------------- summary ---
echo
machine_info
echo "floe:    $FLOE ($FLOE_REV)  WARM=$WARM  fixture $MIB MiB"
BENCH_LIB="$REPO/bench" python3 - "$RESULTS" "$SLOW" "$UNIT_OUT" "$MIB" <<'EOF'
import csv, os, sys
sys.path.insert(0, os.environ["BENCH_LIB"])
from report import f, med

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
slow = list(csv.DictReader(open(sys.argv[2]), delimiter="\t"))
unit_out, mib = sys.argv[3], int(sys.argv[4])

def s(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)

def show(h, t):
    w = [max(len(h[i]), *(len(r[i]) for r in t)) for i in range(len(h))]
    print("  " + "  ".join(h[i].rjust(w[i]) for i in range(len(h))))
    for r in t:
        print("  " + "  ".join(r[i].rjust(w[i]) for i in range(len(h))))

def sel(tracker, phase, p=None):
    return [r for r in rows if r["tracker"] == tracker and r["phase"] == phase and (p is None or r["p"] == p)]

def m(rs, key):
    return med(f(r[key]) for r in rs)

trackers = list(dict.fromkeys(r["tracker"] for r in rows))
percents = list(dict.fromkeys(r["p"] for r in rows))
percents.sort(key=float)
size = f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"
verdicts = []
nrep = max((len(sel(t, "inc", p)) for t in trackers for p in percents), default=0)

for t in trackers:
    full = sel(t, "full")
    full_total = m(full, "total_ms")
    print()
    print(f"{t} tracker, {size} fixture: median of {nrep} run(s) per P; full = pre-dump 0 "
          f"(all {len(full)} runs), P% = incremental pre-dump after dirtying P% of the pages, "
          f"0 = incremental pre-dump with nothing dirtied (all runs)")
    hdr = ["P%", "scan ms", "bytes written", "stop ms", "total ms", "ratio vs full"]
    tab = []
    def line(label, rs, scan):
        tot = m(rs, "total_ms")
        pb = m(rs, "page_bytes")
        tab.append([label, scan, s(pb and pb / 2**20, "{:.2f} MiB"), s(m(rs, "frozen_ms"), "{:.2f}"),
                    s(tot, "{:.1f}"), s(tot and full_total and tot / full_total, "{:.4f}")])
    line("full", full, "-")
    zero = sel(t, "zero")
    if t == "uffd":
        scan0 = s(m(sel(t, "strace-zero"), "scan_ms"), "{:.3f}")
    else:
        scan0 = "n/a"
    line("0", zero, scan0)
    for p in percents:
        if t == "uffd":
            sc = s(m(sel(t, "strace-inc", p), "scan_ms"), "{:.3f}")
        else:
            sc = "n/a"
        line(p, sel(t, "inc", p), sc)
    show(hdr, tab)

    print()
    print(f"  {t} details (medians): timings from floe's JSON, ms; stop = frozen_ms = freeze_ms + collect_ms for a")
    print("  pre-dump (pages are copied after the process is resumed); d-collect = collect_ms(P) - collect_ms(0 dirty)")
    hdr = ["phase", "P%", "freeze", "collect", "d-collect", "memory", "commit", "stop", "total",
           "pages written", "pages dirtied", "reused pages", "dirty pass ns/page"]
    tab = []
    c0 = m(zero, "collect_ms")
    def dline(label, p, rs):
        pages = m(rs, "page_bytes")
        col = m(rs, "collect_ms")
        tab.append([label, p, s(m(rs, "freeze_ms"), "{:.2f}"), s(col, "{:.2f}"),
                    s(None if col is None or c0 is None or label != "pre-dump" or p in ("-", "0") else col - c0, "{:+.2f}"),
                    s(m(rs, "memory_ms")), s(m(rs, "commit_ms")), s(m(rs, "frozen_ms"), "{:.2f}"),
                    s(m(rs, "total_ms")), s(pages and pages / 4096, "{:.0f}"),
                    s(m(rs, "dirty_pages"), "{:.0f}"), s(m(rs, "reused_pages"), "{:.0f}"),
                    s(m(rs, "dirty_ns_per_page"))])
    dline("pre-dump full", "-", full)
    dline("pre-dump", "0", zero)
    for p in percents:
        dline("pre-dump", p, sel(t, "inc", p))
    for p in percents:
        if sel(t, "final", p):
            dline("final dump", p, sel(t, "final", p))
    show(hdr, tab)
    if t == "uffd" and sel(t, "strace-inc"):
        print("  scan ms = sum of the durations (strace -T) of the PAGEMAP_SCAN ioctls of the tracker's dirty-page")
        print("  scan, measured in a separate pre-dump per run with the same dirty percentage (its other timings")
        print("  are inflated by strace and not used). Row 0: the same with nothing dirtied.")
        ioc = med(f(r["scan_ioctls"]) for r in sel(t, "strace-inc"))
        print(f"  ioctls per scan (median): {s(ioc, '{:.0f}')}")
    if t == "hash":
        print("  hash: no scan; every present page is read and hashed in memory_ms, while the process runs.")
    if sel(t, "final"):
        print("  final dump: `floe dump --prev-images-dir` after dirtying P% again; the process stays stopped for")
        print("  the whole dump (stop = frozen_ms) and is killed.")

    # targets
    if t == "uffd":
        scans = [(p, m(sel(t, "strace-inc", p), "scan_ms")) for p in percents]
        scans.append(("0", m(sel(t, "strace-zero"), "scan_ms")))
        scans = [(p, v) for p, v in scans if v is not None]
        if scans:
            worst = max(scans, key=lambda x: x[1])
            verdicts.append(f"uffd scan of {size}: worst {worst[1]:.3f} ms (P={worst[0]}%), target <= 15 ms: "
                            f"{'PASS' if worst[1] <= 15 else 'FAIL'}  [" +
                            ", ".join(f"P={p}%: {v:.3f}" for p, v in scans) + "]")
    stops = [(p, m(sel(t, "inc", p), "frozen_ms")) for p in percents] + [("0", m(zero, "frozen_ms"))]
    stops = [(p, v) for p, v in stops if v is not None]
    if stops:
        worst = max(stops, key=lambda x: x[1])
        verdicts.append(f"{t}: stop time per incremental pre-dump: worst {worst[1]:.2f} ms (P={worst[0]}%), "
                        f"target <= 2 ms: {'PASS' if worst[1] <= 2 else 'FAIL'}  [" +
                        ", ".join(f"P={p}%: {v:.2f}" for p, v in stops) +
                        f"; full pre-dump {s(m(full, 'frozen_ms'), '{:.2f}')}]")
    one = m(sel(t, "inc", "1"), "total_ms")
    if one is not None and full_total:
        r = one / full_total
        verdicts.append(f"{t}: 1%-dirty incremental pre-dump {one:.1f} ms = {100 * r:.2f}% of the full pre-dump "
                        f"({full_total:.1f} ms), target <= 5%: {'PASS' if r <= 0.05 else 'FAIL'}")

if slow:
    print()
    print("workload slowdown: the fixture's own sweep over every page, ns/page (median of the sweeps);")
    print("  word = one 64-bit store per page, page = rewrite of the whole 4 KiB; first-write = the sweep right")
    print("  after a pre-dump (re)armed the tracker; second-write = the next sweep (no pre-dump in between)")
    hdr = ["tracker", "mode", "untracked", "first-write", "ratio", "second-write", "ratio"]
    tab = []
    for t in dict.fromkeys(r["tracker"] for r in slow):
        for mode in ("word", "page"):
            g = lambda st: med(f(r["ns_per_page"]) for r in slow if r["tracker"] == t and r["mode"] == mode and r["state"] == st)
            u, a, b = g("untracked"), g("first-write"), g("second-write")
            tab.append([t, mode, s(u), s(a), s(a and u and a / u, "{:.2f}x"), s(b), s(b and u and b / u, "{:.2f}x")])
            if a and u:
                verdicts.append(f"{t}: workload slowdown ({mode} sweep) right after a pre-dump: {a / u:.2f}x "
                                f"({u:.1f} -> {a:.1f} ns/page, +{a - u:.0f} ns per first write)")
    show(hdr, tab)

if os.path.exists(unit_out):
    print()
    print("engine unit benchmark track_uffd_scan_1gib (PAGEMAP_SCAN of a 1 GiB tracked buffer, in-process):")
    for l in open(unit_out, errors="replace"):
        if l.startswith(("uffd_start", "round", "test ", "error", "warning: unit")) or "panicked" in l:
            print("  " + l.rstrip())

if verdicts:
    print()
    print("targets:")
    for v in verdicts:
        print("  " + v)
EOF
