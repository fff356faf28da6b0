#!/usr/bin/env bash
# Live migration between two network-namespace "hosts", beside same-run QUIC
# and TCP bulk-transfer ceilings over the same veth. See bench/README.md,
# section "Live migration (migrate.sh)".
#
#   sudo bench/migrate.sh
#   RATES="32" REPEAT=3 bench/migrate.sh
#   FLOE_BIN_DIR=target/release KEEP=1 bench/migrate.sh
#
# Environment:
#   MIB              memory of the workload (migcounter) in MiB  (default 1024)
#   RATES            dirty rates of the workload in MiB/s         (default "0 8 32 128")
#   REPEAT           migrations per rate                          (default 1)
#   NET_BYTES        bytes of one baseline transfer               (default 1 GiB)
#   NET_REPEAT       transfers per baseline (median is used)      (default 3)
#   MTU              MTU of the veth between the two hosts        (default 9000)
#   SETTLE_S         seconds between the workload's ready file and
#                    the migration                                (default 2)
#   MIGRATE_ARGS     extra arguments for `floe migrate`           (default empty)
#   VERIFY           1 = after each migration the moved process checks its
#                    whole memory (SIGUSR2) before it is killed   (default 1)
#   DOWNTIME_TARGET_MS  downtime target at TARGET_RATE            (default 30)
#   TARGET_RATE      the dirty rate the downtime target is judged at (default 32)
#   THROUGHPUT_TARGET   pre-copy / QUIC ceiling target            (default 0.85)
#   FLOE_BIN_DIR     directory with prebuilt floe, floe-agent and floe-netbench;
#                    if unset, `cargo build --release -p floe-cli -p floe-agent`
#                    is run and target/release is used
#   BENCH_TMP        parent of the work dir                       (default /var/tmp)
#   KEEP             1 = keep the work dir (agent logs, events, workload logs)
#   RESULTS_TSV      also copy the raw per-migration results to this file, and
#                    the baseline transfers to RESULTS_TSV with .net.tsv in
#                    place of its extension
set -euo pipefail

MIB=${MIB:-1024}
RATES=${RATES:-"0 8 32 128"}
REPEAT=${REPEAT:-1}
NET_BYTES=${NET_BYTES:-$((1 << 30))}
NET_REPEAT=${NET_REPEAT:-3}
MTU=${MTU:-9000}
SETTLE_S=${SETTLE_S:-2}
MIGRATE_ARGS=${MIGRATE_ARGS:-}
VERIFY=${VERIFY:-1}
DOWNTIME_TARGET_MS=${DOWNTIME_TARGET_MS:-30}
TARGET_RATE=${TARGET_RATE:-32}
THROUGHPUT_TARGET=${THROUGHPUT_TARGET:-0.85}
FLOE_BIN_DIR=${FLOE_BIN_DIR:-}
BENCH_TMP=${BENCH_TMP:-/var/tmp}
KEEP=${KEEP:-0}
RESULTS_TSV=${RESULTS_TSV:-}

READY_TIMEOUT_S=120   # the workload filling its memory
AGENT_TIMEOUT_S=10    # an agent creating its control socket
MIGRATE_TIMEOUT_S=900 # one `floe migrate`
NET_TIMEOUT_S=120     # one baseline transfer
VERIFY_TIMEOUT_S=120  # the moved workload checking its memory
GONE_TIMEOUT_S=15     # a killed process disappearing from /proc

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

log() { printf '%s\n' "$*" >&2; }
die() {
	log "migrate-bench: ERROR: $*"
	exit 1
}
warn() { log "migrate-bench: warning: $*"; }

# ---------------------------------------------------------------- checks ---
[[ $(id -u) == 0 ]] || die "must run as root (ptrace, network namespaces)"
[[ $MIB =~ ^[1-9][0-9]*$ ]] || die "MIB must be a positive integer, got '$MIB'"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer, got '$REPEAT'"
[[ $NET_REPEAT =~ ^[1-9][0-9]*$ ]] || die "NET_REPEAT must be a positive integer, got '$NET_REPEAT'"
[[ $NET_BYTES =~ ^[1-9][0-9]*$ ]] || die "NET_BYTES must be a positive integer, got '$NET_BYTES'"
[[ $MTU =~ ^[1-9][0-9]*$ && $MTU -ge 1280 && $MTU -le 65535 ]] || die "MTU must be an integer from 1280 to 65535, got '$MTU'"
[[ $SETTLE_S =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "SETTLE_S must be a number of seconds, got '$SETTLE_S'"
[[ -n $RATES ]] || die "RATES is empty"
for r in $RATES; do
	[[ $r =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "RATES must be MiB/s numbers, got '$r'"
done
for c in python3 gcc ip nsenter setsid timeout pgrep stat; do
	command -v "$c" >/dev/null || die "$c is required"
done

# ----------------------------------------------------- state and cleanup ---
TAG=$$
NSA=floe-mb-$TAG-a NSB=floe-mb-$TAG-b
VETHA=fmb${TAG}a VETHB=fmb${TAG}b
IPA=10.98.0.1 IPB=10.98.0.2
# Agent names are unique too: an agent clears stale scratch in /run/floe/NAME at start, which
# must not hit the agents of a concurrent demo or test (they use hosta/hostb).
HOSTA=hosta-$TAG HOSTB=hostb-$TAG
WORK=""
PIDS=() # agents and baseline servers we started
NETNS_MADE=0

cleanup() {
	local rc=$? p ns
	trap - EXIT INT TERM
	for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	if [[ $NETNS_MADE == 1 ]]; then
		# Whatever still runs in the two hosts (workloads, migrated copies, pid-namespace inits).
		for ns in $NSA $NSB; do
			for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
		done
		for ns in $NSA $NSB; do
			for p in $(ip netns pids "$ns" 2>/dev/null); do wait_gone "$p" || true; done
			ip netns del "$ns" 2>/dev/null || warn "cannot delete network namespace $ns"
		done
	fi
	rm -rf -- "/run/floe/$HOSTA" "/run/floe/$HOSTB"
	BENCH_NAME=migrate-bench remove_work
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# in_ns NS CMD... : run CMD in host NS's network namespace only (it shares the mount
# namespace with us, the agents and the workload; `ip netns exec` would make a new one)
in_ns() {
	local ns=$1
	shift
	nsenter --net="/run/netns/$ns" "$@"
}

# copy_in NS -> pids of migcounter processes in host NS (by network namespace)
copy_in() {
	local want p
	want=$(stat -Lc %i "/run/netns/$1")
	for p in $(pgrep -x migcounter); do
		if [[ $(stat -Lc %i "/proc/$p/ns/net" 2>/dev/null) == "$want" ]]; then echo "$p"; fi
	done
}

tail_agents() {
	local h
	for h in a b; do
		log "---- last lines of agent $h's log ($WORK/agent-$h.log)"
		tail -n 25 "$WORK/agent-$h.log" >&2 || true
	done
}

WORK=$(mktemp -d "$BENCH_TMP/floe-migrate.XXXXXX")
RESULTS=$WORK/results.tsv
NETRES=$WORK/net.tsv
printf 'rate_mibs\trep\tstatus\tdowntime_ms\tfreeze_ms\tfinal_scan_ms\tfinal_dump_ms\tfinal_transfer_ms\trestore_finish_ms\tresume_ms\ttotal_ms\tprecopy_ms\titerations\tconverged\twire_bytes\tfinal_bytes\tmemory_bytes\tpage_bytes_sent\tpass0_page_bytes\tpass0_ms\tpass0_gib_s\tdirty_tracker\tlog_lines\tlog_gaps\tverify\twarnings\tmessages\n' >"$RESULTS"
printf 'kind\trep\tbytes\tsecs\tgib_s\n' >"$NETRES"

# ----------------------------------------------------------------- build ---
if [[ -z $FLOE_BIN_DIR ]]; then
	log "migrate-bench: cargo build --release -p floe-cli -p floe-agent"
	(cd "$REPO" && cargo build --release -q -p floe-cli -p floe-agent) || die "cargo build failed"
	FLOE_BIN_DIR="${CARGO_TARGET_DIR:-$REPO/target}/release"
	FLOE_REV="built from $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?')"
else
	FLOE_REV=prebuilt
fi
FLOE=$FLOE_BIN_DIR/floe AGENT=$FLOE_BIN_DIR/floe-agent NETBENCH=$FLOE_BIN_DIR/floe-netbench
for b in "$FLOE" "$AGENT" "$NETBENCH"; do
	[[ -x $b ]] || die "binary not found/executable: $b (FLOE_BIN_DIR=$FLOE_BIN_DIR)"
done
gcc -O2 -Wall -o "$WORK/migcounter" "$REPO/tests/fixtures/migcounter.c" || die "cannot build tests/fixtures/migcounter.c"

# JSON events of one `floe migrate --json` -> one TSV fragment (status .. error, without the
# workload's log columns)
cat >"$WORK/events.py" <<'EOF'
import json, sys
report, error, first, warnings = None, "", None, []
for line in open(sys.argv[1], errors="replace"):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    ev = e.get("event")
    if ev == "report":
        report = e
    elif ev == "error":
        error = e.get("message", "?")
    elif ev == "warning":
        warnings.append(e.get("message", "?"))
    elif ev == "pass" and first is None:
        first = e
clean = lambda s: " ".join(str(s).split()).replace("\t", " ")
if report is None:
    if not error:
        error = clean(open(sys.argv[2], errors="replace").read())[-400:] or "no report and no error event"
    print("\t".join(["failed"] + ["nan"] * 18 + ["", str(len(warnings)), clean(error)]))
    sys.exit(0)
d = report["downtime"]
p0_bytes = first["page_bytes"] if first else 0
p0_ms = first["duration_ms"] if first else 0.0
p0 = p0_bytes / 2**30 / (p0_ms / 1000) if p0_ms > 0 else float("nan")
vals = ["ok", d["total_ms"], d["freeze_ms"], d["final_scan_ms"], d["final_dump_ms"], d["final_transfer_ms"],
        d["restore_finish_ms"], d["resume_ms"], report["total_ms"], report["precopy_ms"], report["iterations"],
        str(report["converged"]).lower(), report["wire_bytes"], report["final_bytes"], report["memory_bytes"],
        report["page_bytes_sent"], p0_bytes, p0_ms, f"{p0:.4f}", report["dirty_tracker"], len(warnings),
        clean("; ".join(warnings))]
print("\t".join(str(v) for v in vals))
EOF

# The workload's log -> "LINES GAPS" (GAPS: "none" or the first few (a,b) pairs)
cat >"$WORK/gaps.py" <<'EOF'
import re, sys
seqs = []
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"seq=(\d+) ", line)
    if m:
        seqs.append(int(m.group(1)))
gaps = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
if seqs and seqs[0] != 1:
    gaps.insert(0, (0, seqs[0]))
print(len(seqs), "none" if not gaps else ",".join(f"{a}->{b}" for a, b in gaps[:5]) + (" ..." if len(gaps) > 5 else ""))
EOF

# ------------------------------------------------------------------ hosts ---
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${LOAD0%% *}" 'BEGIN { exit !(l > 0.5) }'; then
	warn "load average is $LOAD0 -- other work on this machine adds noise"
fi
ip netns add "$NSA" || die "cannot create network namespace $NSA"
NETNS_MADE=1
ip netns add "$NSB" || die "cannot create network namespace $NSB"
ip link add "$VETHA" netns "$NSA" type veth peer name "$VETHB" netns "$NSB" || die "cannot create the veth pair"
ip -n "$NSA" addr add "$IPA/24" dev "$VETHA"
ip -n "$NSB" addr add "$IPB/24" dev "$VETHB"
ip -n "$NSA" link set lo up
ip -n "$NSB" link set lo up
ip -n "$NSA" link set "$VETHA" mtu "$MTU" up
ip -n "$NSB" link set "$VETHB" mtu "$MTU" up

agent_configs "$WORK" "$FLOE" "$HOSTA" "$IPA" "$HOSTB" "$IPB"
# (nsenter directly, not through in_ns, so that $! is the agent: nsenter execs it)
nsenter --net="/run/netns/$NSA" "$AGENT" -c "$WORK/a.toml" >"$WORK/agent-a.log" 2>&1 &
AGENT_A=$!
disown "$AGENT_A" # no "Killed" job notice at cleanup
PIDS+=("$AGENT_A")
nsenter --net="/run/netns/$NSB" "$AGENT" -c "$WORK/b.toml" >"$WORK/agent-b.log" 2>&1 &
AGENT_B=$!
disown "$AGENT_B"
PIDS+=("$AGENT_B")
for h in a b; do
	if ! wait_file "$WORK/$h.sock" "$AGENT_TIMEOUT_S"; then
		tail -n 30 "$WORK/agent-$h.log" >&2 || true
		die "agent $h did not create its control socket within ${AGENT_TIMEOUT_S}s"
	fi
done
log "migrate-bench: hosts $HOSTA ($IPA, netns $NSA) and $HOSTB ($IPB, netns $NSB), veth MTU $MTU, agents running"

# -------------------------------------------------------------- baselines ---
# net_once KIND REP PORT: one transfer of NET_BYTES from host A to a server in host B
net_once() {
	local kind=$1 rep=$2 port=$3 out=$WORK/net-$1-$2 srv rc=0
	local tlsb=(--ca "$WORK/pki/ca.pem" --cert "$WORK/pki/$HOSTB.pem" --key "$WORK/pki/$HOSTB.key")
	local tlsa=(--ca "$WORK/pki/ca.pem" --cert "$WORK/pki/$HOSTA.pem" --key "$WORK/pki/$HOSTA.key")
	if [[ $kind == quic ]]; then
		nsenter --net="/run/netns/$NSB" "$NETBENCH" quic-server --listen "$IPB:$port" "${tlsb[@]}" --timeout "$NET_TIMEOUT_S" \
			>"$out.server" 2>"$out.server.err" &
	else
		nsenter --net="/run/netns/$NSB" "$NETBENCH" tcp-server --listen "$IPB:$port" --timeout "$NET_TIMEOUT_S" \
			>"$out.server" 2>"$out.server.err" &
	fi
	srv=$!
	PIDS+=("$srv")
	local i
	for ((i = 0; i < 200; i++)); do
		grep -q listening "$out.server.err" 2>/dev/null && break
		kill -0 "$srv" 2>/dev/null || break
		sleep 0.025
	done
	grep -q listening "$out.server.err" 2>/dev/null || {
		cat "$out.server.err" >&2
		die "floe-netbench $kind-server did not start"
	}
	if [[ $kind == quic ]]; then
		in_ns "$NSA" timeout "$NET_TIMEOUT_S" "$NETBENCH" quic-client --connect "$IPB:$port" --server-name "$HOSTB" \
			"${tlsa[@]}" --bytes "$NET_BYTES" >"$out" 2>"$out.err" || rc=$?
	else
		in_ns "$NSA" timeout "$NET_TIMEOUT_S" "$NETBENCH" tcp-client --connect "$IPB:$port" --bytes "$NET_BYTES" \
			>"$out" 2>"$out.err" || rc=$?
	fi
	if ! wait "$srv"; then
		cat "$out.server.err" >&2
		warn "floe-netbench $kind-server failed"
		rc=1
	fi
	if [[ $rc != 0 ]]; then
		cat "$out.err" >&2
		die "floe-netbench $kind-client failed (exit $rc)"
	fi
	python3 -c '
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(sys.argv[2], sys.argv[3], r["bytes"], "%.6f" % r["secs"], "%.4f" % r["gib_s"], sep="\t")
' "$out" "$kind" "$rep" >>"$NETRES" || die "bad floe-netbench output in $out"
	log "migrate-bench:   $kind $rep: $(cut -f5 < <(tail -n 1 "$NETRES")) GiB/s"
}

log "migrate-bench: baselines: $NET_REPEAT x (QUIC, TCP) of $NET_BYTES bytes, $HOSTA -> $HOSTB"
for ((rep = 1; rep <= NET_REPEAT; rep++)); do
	# alternate the order between repeats
	if ((rep % 2 == 1)); then kinds=(quic tcp); else kinds=(tcp quic); fi
	for k in "${kinds[@]}"; do
		port=$((7500 + rep * 2))
		[[ $k == tcp ]] && port=$((port + 1))
		net_once "$k" "$rep" "$port"
	done
done

# ------------------------------------------------------------- migrations ---
# migrate_once RATE REP
migrate_once() {
	local rate=$1 rep=$2 run=$WORK/run-$1-$2 pid rc=0 row lines gaps verify=skipped new old
	mkdir -p "$run"
	nsenter --net="/run/netns/$NSA" env MIGCOUNTER_DIRTY_MIBS="$rate" setsid "$WORK/migcounter" "$run/log" "$MIB" \
		"$run" </dev/null >"$run/out" 2>&1 &
	disown "$!"
	if ! wait_file "$run/ready" "$READY_TIMEOUT_S"; then
		cat "$run/out" >&2
		die "migcounter did not become ready within ${READY_TIMEOUT_S}s"
	fi
	pid=$(sed -n 's/^pid=//p' "$run/ready")
	[[ $pid =~ ^[0-9]+$ ]] || die "bad ready file $run/ready"
	sleep "$SETTLE_S"
	log "migrate-bench: rate $rate MiB/s, run $rep: floe migrate $pid --to $HOSTB -n --json $MIGRATE_ARGS"
	# shellcheck disable=SC2086 # MIGRATE_ARGS is a word list on purpose
	FLOE_AGENT_SOCKET=$WORK/a.sock timeout "$MIGRATE_TIMEOUT_S" "$FLOE" migrate "$pid" --to "$HOSTB" -n --json \
		$MIGRATE_ARGS >"$run/events.jsonl" 2>"$run/migrate.err" || rc=$?
	row=$(python3 "$WORK/events.py" "$run/events.jsonl" "$run/migrate.err") || die "cannot parse $run/events.jsonl"
	sleep 0.3
	new=$(copy_in "$NSB" | head -n 1)
	old=$(copy_in "$NSA" | head -n 1)
	if [[ ${row%%$'\t'*} != ok || $rc != 0 ]]; then
		warn "migration at $rate MiB/s failed (exit $rc): $(awk -F'\t' '{ print $NF }' <<<"$row")"
		tail_agents
		[[ $KEEP == 1 ]] || log "migrate-bench: (KEEP=1 keeps the work dir with both agents' logs)"
	fi
	if [[ -n $old && -n $new ]]; then
		warn "copies of the workload run in both hosts after the migration (A: $old, B: $new)"
	elif [[ ${row%%$'\t'*} == ok && -z $new ]]; then
		warn "the migration reported success but no copy of the workload runs in $HOSTB"
	fi
	if [[ $VERIFY == 1 && -n $new ]]; then
		kill -USR2 "$new" 2>/dev/null || true
		if wait_file "$run/verify" "$VERIFY_TIMEOUT_S"; then
			verify=$(cut -d' ' -f1 "$run/verify")
			verify=${verify#verify=}
			[[ $verify == ok ]] || warn "memory check of the moved workload: $(cat "$run/verify")"
		else
			verify=timeout
			warn "the moved workload did not answer the memory check within ${VERIFY_TIMEOUT_S}s"
		fi
	fi
	# Stop every workload copy (and pid-namespace init) before reading the log.
	kill_ns_except "$NSB" "$AGENT_B"
	kill_ns_except "$NSA" "$AGENT_A"
	read -r lines gaps < <(python3 "$WORK/gaps.py" "$run/log")
	[[ $gaps == none ]] || warn "the workload's log at $rate MiB/s has gaps or duplicates: $gaps ($run/log)"
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rate" "$rep" "$(cut -f1-20 <<<"$row")" "${lines:-0}" "${gaps:-?}" \
		"$verify" "$(cut -f21- <<<"$row")" >>"$RESULTS"
}

# shellcheck disable=SC2206 # word list on purpose
RLIST=($RATES)
for ((rep = 1; rep <= REPEAT; rep++)); do
	for r in "${RLIST[@]}"; do migrate_once "$r" "$rep"; done
done

if [[ -n $RESULTS_TSV ]]; then
	cp -- "$RESULTS" "$RESULTS_TSV" || die "cannot write $RESULTS_TSV"
	cp -- "$NETRES" "${RESULTS_TSV%.*}.net.tsv" || die "cannot write ${RESULTS_TSV%.*}.net.tsv"
fi

# ----------------------------------------------------------------- report ---
echo
echo "machine: $(uname -r), $(nproc) cpu(s), $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
echo "         load average at start $LOAD0, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "floe:    $FLOE_BIN_DIR ($FLOE_REV)  workload migcounter $MIB MiB  veth MTU $MTU  MIGRATE_ARGS='$MIGRATE_ARGS'"
BENCH_LIB="$REPO/bench" python3 - "$RESULTS" "$NETRES" "$TARGET_RATE" "$DOWNTIME_TARGET_MS" "$THROUGHPUT_TARGET" <<'EOF'
import csv, os, sys
sys.path.insert(0, os.environ["BENCH_LIB"])
from report import f, fmt, med

rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
net = list(csv.DictReader(open(sys.argv[2]), delimiter="\t"))
target_rate, dt_target, tp_target = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])

MIB = 1 << 20
print()
print("rate MiB/s | downtime ms (freeze / final scan / final dump / final transfer / restore finish / resume) | total ms | iterations | converged | bytes on wire (MiB) | memory (MiB) | pass-0 GiB/s")
for r in rows:
    if r["status"] != "ok":
        print(f"{r['rate_mibs']:>10} | FAILED: {r['messages']}")
        continue
    parts = " / ".join(fmt(f(r[k])) for k in ("freeze_ms", "final_scan_ms", "final_dump_ms", "final_transfer_ms",
                                               "restore_finish_ms", "resume_ms"))
    print(f"{r['rate_mibs']:>10} | {fmt(f(r['downtime_ms'])):>7} ({parts}) | {fmt(f(r['total_ms']), '.0f'):>8} | "
          f"{r['iterations']:>10} | {r['converged']:>9} | {fmt(f(r['wire_bytes']) / MIB, '.1f'):>19} | "
          f"{fmt(f(r['memory_bytes']) / MIB, '.1f'):>12} | {fmt(f(r['pass0_gib_s']), '.3f'):>12}")
bad = [r for r in rows if r["log_gaps"] not in ("none",) or r["verify"] not in ("ok", "skipped")]
for r in bad:
    print(f"  rate {r['rate_mibs']} run {r['rep']}: log gaps {r['log_gaps']}, memory check {r['verify']}")
for r in rows:
    if r["status"] == "ok" and r["warnings"] not in ("0", ""):
        print(f"  rate {r['rate_mibs']} run {r['rep']}: {r['warnings']} warning(s): {r['messages']}")

quic = med([f(n["gib_s"]) for n in net if n["kind"] == "quic"])
tcp = med([f(n["gib_s"]) for n in net if n["kind"] == "tcp"])
pre = med([f(r["pass0_gib_s"]) for r in rows if r["status"] == "ok"])
def spread(kind):
    xs = sorted(f(n["gib_s"]) for n in net if n["kind"] == kind)
    return ", ".join(f"{x:.3f}" for x in xs)
print()
print(f"baselines over the same veth (median of {sum(1 for n in net if n['kind'] == 'quic')}): "
      f"QUIC ceiling {fmt(quic, '.3f')} GiB/s [{spread('quic')}], plain TCP {fmt(tcp, '.3f')} GiB/s [{spread('tcp')}]")
ratio = pre / quic if pre is not None and quic else None
print(f"pre-copy throughput (median pass 0 of all runs) {fmt(pre, '.3f')} GiB/s = {fmt(ratio, '.2f')} x the QUIC ceiling"
      f" ({fmt(pre / tcp if pre is not None and tcp else None, '.2f')} x TCP)")

at = [r for r in rows if f(r["rate_mibs"]) == target_rate]
dt = med([f(r["downtime_ms"]) for r in at if r["status"] == "ok"])
print()
if not at:
    print(f"n/a   downtime at {target_rate:g} MiB/s <= {dt_target:g} ms (no run at that rate)")
elif dt is None or any(r["status"] != "ok" for r in at):
    print(f"FAIL  downtime at {target_rate:g} MiB/s <= {dt_target:g} ms: a migration failed")
else:
    print(f"{'PASS' if dt <= dt_target else 'FAIL'}  downtime at {target_rate:g} MiB/s <= {dt_target:g} ms: {dt:.1f} ms")
if ratio is None:
    print(f"FAIL  pre-copy throughput >= {tp_target:.0%} of the QUIC ceiling: not measured")
else:
    print(f"{'PASS' if ratio >= tp_target else 'FAIL'}  pre-copy throughput >= {tp_target:.0%} of the QUIC ceiling: "
          f"{ratio:.0%} ({pre:.3f} / {quic:.3f} GiB/s)")
if any(r["status"] != "ok" for r in rows) or bad:
    print("WARNING: some migrations failed or lost log lines / memory (see above)")
EOF
