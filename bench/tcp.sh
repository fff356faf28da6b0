#!/usr/bin/env bash
# Established TCP connections (issue 6): (A) what --tcp-established costs in
# the freeze window for 100 idle connections (network lock, TCP_REPAIR,
# unlock), beside a same-run server with none; (B) the longest pause a busy
# redis client sees while redis live-migrates to another host with its
# connection and service address. See bench/README.md, section
# "TCP connections (tcp.sh)".
#
#   sudo bench/tcp.sh
#   REPEAT=5 bench/tcp.sh
#   PARTS=A CONNS=1000 bench/tcp.sh
#   FLOE_BIN_DIR=target/release KEEP=1 bench/tcp.sh
#
# Environment:
#   PARTS            which parts to run: "A", "B" or "A B"        (default "A B")
#   REPEAT           runs of each measurement (median and range)  (default 3)
#   CONNS            (A) idle connections held by the client      (default 100)
#   LOCK_TARGET_MS   (A) target for lock + TCP_REPAIR + unlock of CONNS
#                    connections                                  (default 5)
#   REDIS_MB         (B) megabytes the client loads into redis    (default 200)
#   SETTLE_S         (B) seconds the client runs after loading, before the
#                    migration                                    (default 2)
#   AFTER_S          (B) seconds after the migration before the client's
#                    figures are read                             (default 3)
#   GAP_TARGET_MS    (B) target for the client's longest gap      (default 50)
#   MIGRATE_ARGS     (B) extra arguments for `floe migrate`       (default empty)
#   CLIENT_RTO_MIN   (B) diagnostic: if set (e.g. "20ms"), the client host's
#                    route to the LAN gets `rto_min CLIENT_RTO_MIN` (the
#                    client's minimum retransmission timeout; Linux: 200ms)
#                                                                 (default unset)
#   FLOE_BIN_DIR     directory with prebuilt floe and floe-agent; if unset,
#                    `cargo build --release -p floe-cli -p floe-agent` is run
#                    and target/release is used
#   BENCH_TMP        parent of the work dir                       (default /var/tmp)
#   KEEP             1 = keep the work dir (JSON, agent logs, client stats)
#   RESULTS_TSV      also copy the raw per-run results of part A to this file,
#                    and those of part B to RESULTS_TSV with .redis.tsv in
#                    place of its extension
set -euo pipefail

PARTS=${PARTS:-"A B"}
REPEAT=${REPEAT:-3}
CONNS=${CONNS:-100}
LOCK_TARGET_MS=${LOCK_TARGET_MS:-5}
REDIS_MB=${REDIS_MB:-200}
SETTLE_S=${SETTLE_S:-2}
AFTER_S=${AFTER_S:-3}
GAP_TARGET_MS=${GAP_TARGET_MS:-50}
MIGRATE_ARGS=${MIGRATE_ARGS:-}
CLIENT_RTO_MIN=${CLIENT_RTO_MIN:-}
FLOE_BIN_DIR=${FLOE_BIN_DIR:-}
BENCH_TMP=${BENCH_TMP:-/var/tmp}
KEEP=${KEEP:-0}
RESULTS_TSV=${RESULTS_TSV:-}

START_TIMEOUT_S=20    # a fixture, redis or an agent starting
CHECK_TIMEOUT_S=20    # the client checking its connections (it gives up after 10 s itself)
FLOE_TIMEOUT_S=120    # one floe dump / restore
LOAD_TIMEOUT_S=300    # the redis client loading REDIS_MB
MIGRATE_TIMEOUT_S=600 # one floe migrate
STATS_TIMEOUT_S=15    # the redis client writing its stats on SIGUSR1
GONE_TIMEOUT_S=15     # a killed process disappearing from /proc
REDIS_PORT=6379

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"

log() { printf '%s\n' "$*" >&2; }
die() {
	log "tcp-bench: ERROR: $*"
	exit 1
}
warn() { log "tcp-bench: warning: $*"; }
# kv KEY "k=v k=v ..." -> v
kv() {
	awk -v k="$1=" '{ for (i = 1; i <= NF; i++) if (index($i, k) == 1) { print substr($i, length(k) + 1); exit } }' <<<"$2"
}

# ---------------------------------------------------------------- checks ---
[[ $(id -u) == 0 ]] || die "must run as root (ptrace, TCP_REPAIR, nftables, network namespaces)"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive integer, got '$REPEAT'"
[[ $CONNS =~ ^[1-9][0-9]*$ ]] || die "CONNS must be a positive integer, got '$CONNS'"
[[ $REDIS_MB =~ ^[1-9][0-9]*$ ]] || die "REDIS_MB must be a positive integer, got '$REDIS_MB'"
for v in SETTLE_S AFTER_S LOCK_TARGET_MS GAP_TARGET_MS; do
	[[ ${!v} =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "$v must be a number, got '${!v}'"
done
[[ -z $CLIENT_RTO_MIN || $CLIENT_RTO_MIN =~ ^[0-9]+(ms|s)?$ ]] || die "CLIENT_RTO_MIN must look like 20ms, got '$CLIENT_RTO_MIN'"
RUN_A=0 RUN_B=0
for p in $PARTS; do
	case $p in
	A | a) RUN_A=1 ;;
	B | b) RUN_B=1 ;;
	*) die "PARTS must list A and/or B, got '$PARTS'" ;;
	esac
done
((RUN_A + RUN_B > 0)) || die "PARTS is empty"
for c in python3 gcc ip nsenter setsid timeout stat; do
	command -v "$c" >/dev/null || die "$c is required"
done
HAVE_NFT=0
command -v nft >/dev/null && HAVE_NFT=1
((HAVE_NFT)) || warn "nft (nftables) is not installed: left-over floe_ tables are not checked"
B_SKIP=""
if ((RUN_B)); then
	command -v redis-server >/dev/null || B_SKIP="redis-server is not installed"
	command -v ping >/dev/null || B_SKIP="ping (iputils-ping) is not installed"
	[[ -z $B_SKIP ]] || warn "part B SKIPPED: $B_SKIP"
fi
HAVE_ARPING=0
command -v arping >/dev/null && HAVE_ARPING=1

# ----------------------------------------------------- state and cleanup ---
TAG=$$
NS1=floe-tcp-$TAG # part A: one private namespace
# part B: a LAN of three hosts and a switch, as tests/src/netns.rs `Lan`
LAN_A=floe-tb-$TAG-a LAN_B=floe-tb-$TAG-b LAN_C=floe-tb-$TAG-c LAN_S=floe-tb-$TAG-s
IF_A=ftb${TAG}a IF_B=ftb${TAG}b IF_C=ftb${TAG}c
PORT_A=gtb${TAG}a PORT_B=gtb${TAG}b PORT_C=gtb${TAG}c
BRIDGE=btb$TAG
SUBNET=10.97.$((TAG % 256))
IP_A=$SUBNET.1 IP_B=$SUBNET.2 IP_C=$SUBNET.3 SIP=$SUBNET.100
# unique agent names: an agent clears its scratch in /dev/shm/floe/NAME (or /run/floe/NAME)
HOSTA=hosta-$TAG HOSTB=hostb-$TAG
WORK=""
PIDS=()     # agents and other processes we started
MY_NS=()    # namespaces we created

# floe_tables NS -> names of floe_ nftables tables in NS (family and name per line)
floe_tables() {
	((HAVE_NFT)) || return 0
	{ nsenter --net="/run/netns/$1" nft list tables 2>/dev/null || true; } | awk '$3 ~ /^floe_/ { print $2, $3 }'
}

cleanup() {
	local rc=$? p ns fam tab
	trap - EXIT INT TERM
	for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	for ns in "${MY_NS[@]}"; do
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
	done
	for ns in "${MY_NS[@]}"; do
		for p in $(ip netns pids "$ns" 2>/dev/null); do wait_gone "$p" || true; done
		# floe's lock tables die with the namespace; delete them first anyway, so none
		# outlives it should the namespace be pinned by something else
		while read -r fam tab; do
			if [[ -n $tab ]]; then nsenter --net="/run/netns/$ns" nft delete table "$fam" "$tab" 2>/dev/null || true; fi
		done < <(floe_tables "$ns" || true)
		ip netns del "$ns" 2>/dev/null || warn "cannot delete network namespace $ns"
	done
	rm -rf -- "/run/floe/$HOSTA" "/run/floe/$HOSTB" "/dev/shm/floe/$HOSTA" "/dev/shm/floe/$HOSTB"
	BENCH_NAME=tcp-bench remove_work
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# spawn NS OUT CMD... -> SPAWNED: CMD started in network namespace NS only (nsenter --net:
# same mount namespace as floe; `ip netns exec` would make a new one, and floe refuses
# processes in another mount namespace), as a session leader (setsid execs without forking:
# we are not a process-group leader), stdin /dev/null, output to OUT. nsenter and setsid
# exec, so SPAWNED is CMD's pid.
spawn() {
	local ns=$1 out=$2
	shift 2
	(
		# (bench/lib.sh) floe refuses a pipe whose other end is outside the dumped tree,
		# and redis keeps what it inherits
		close_inherited_fds
		exec nsenter --net="/run/netns/$ns" setsid "$@" </dev/null >"$out" 2>&1
	) &
	SPAWNED=$!
	disown "$SPAWNED" 2>/dev/null || true # no "Killed" job notices
}

# pids_in NS COMM -> pids of (non-zombie) processes named COMM in network namespace NS
pids_in() {
	local want p
	want=$(stat -Lc %i "/run/netns/$1")
	for p in $(pgrep -x "$2"); do
		[[ $(awk '/^State:/ { print $2 }' "/proc/$p/status" 2>/dev/null) == Z ]] && continue
		if [[ $(stat -Lc %i "/proc/$p/ns/net" 2>/dev/null) == "$want" ]]; then echo "$p"; fi
	done
}

WORK=$(mktemp -d "$BENCH_TMP/floe-tcp.XXXXXX")
RES_A=$WORK/results-a.tsv
RES_B=$WORK/results-b.tsv

# ----------------------------------------------------------------- build ---
if [[ -z $FLOE_BIN_DIR ]]; then
	log "tcp-bench: cargo build --release -p floe-cli -p floe-agent"
	(cd "$REPO" && cargo build --release -q -p floe-cli -p floe-agent) || die "cargo build failed"
	FLOE_BIN_DIR="${CARGO_TARGET_DIR:-$REPO/target}/release"
	FLOE_REV="built from $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?')"
else
	FLOE_REV=prebuilt
fi
FLOE=$FLOE_BIN_DIR/floe AGENT=$FLOE_BIN_DIR/floe-agent
[[ -x $FLOE ]] || die "binary not found/executable: $FLOE (FLOE_BIN_DIR=$FLOE_BIN_DIR)"
if ((RUN_B)) && [[ -z $B_SKIP ]]; then
	[[ -x $AGENT ]] || die "binary not found/executable: $AGENT (FLOE_BIN_DIR=$FLOE_BIN_DIR)"
fi
gcc -O2 -Wall -o "$WORK/tcpmany" "$REPO/bench/tcpmany.c" || die "cannot build bench/tcpmany.c"

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${LOAD0%% *}" 'BEGIN { exit !(l > 0.5) }'; then
	warn "load average is $LOAD0 -- other work on this machine adds noise"
fi

# =========================================================== part A ===
# One floe JSON document (dump: pretty-printed, restore: one line) -> selected timings
cat >"$WORK/timings.py" <<'EOF'
import json, sys
try:
    t = json.load(open(sys.argv[1]))["timings"]
except Exception:
    print("\t".join(["nan"] * (len(sys.argv) - 2)))
    sys.exit(0)
print("\t".join(str(t.get(k, "nan")) for k in sys.argv[2:]))
EOF
DUMP_KEYS=(freeze_ms collect_ms memory_ms commit_ms frozen_ms lock_ms tcp_repair_ms unlock_ms release_ms total_ms)
RESTORE_KEYS=(create_ms pages_ms finish_ms unlock_ms total_ms)

# floe_in NS OUT ERR ARGS...: floe ARGS inside NS's network namespace, bounded
floe_in() {
	local ns=$1 out=$2 err=$3
	shift 3
	timeout "$FLOE_TIMEOUT_S" nsenter --net="/run/netns/$ns" "$FLOE" "$@" >"$out" 2>"$err"
}

# conn_check DIR PID -> the client's check line (ok=.. of=.. ...)
conn_check() {
	rm -f -- "$1/check"
	kill -USR1 "$2" 2>/dev/null || {
		echo "ok=0 client=gone"
		return 0
	}
	if wait_file "$1/check" "$CHECK_TIMEOUT_S"; then cat "$1/check"; else echo "ok=0 client=no-answer"; fi
}

# a_once REP N: server with N connections; leave-running dump, killing dump, restore
a_once() {
	local rep=$1 n=$2 run=$WORK/a-$1-$2 spid cpid=0 port rc chk lr_ok=- rs_ok=- rs_chk=- tab_lr tab_between tab_after
	local rs_pid_ok=- lr_tim kd_tim rs_tim
	mkdir -p "$run"
	spawn "$NS1" "$run/server.log" "$WORK/tcpmany" server 0 "$n" "$run"
	spid=$SPAWNED
	wait_file "$run/listen" "$START_TIMEOUT_S" || die "tcpmany server did not listen: $(cat "$run/server.log")"
	port=$(sed -n 's/^port=//p' "$run/listen")
	if ((n > 0)); then
		spawn "$NS1" "$run/client.log" "$WORK/tcpmany" client "$port" "$n" "$run"
		cpid=$SPAWNED
		wait_file "$run/client" "$START_TIMEOUT_S" || die "tcpmany client did not connect: $(cat "$run/client.log")"
	fi
	wait_file "$run/ready" "$START_TIMEOUT_S" || die "tcpmany server did not accept $n connections: $(cat "$run/server.log")"
	[[ $(sed -n 's/^pid=//p' "$run/ready") == "$spid" ]] || die "tcpmany server pid mismatch ($spid vs $run/ready)"
	if ((n > 0)); then
		chk=$(conn_check "$run" "$cpid")
		[[ $(kv ok "$chk") == "$n" ]] || die "$n connections set up, but the client's first check says: $chk"
	fi
	sleep 0.2

	# 1. leave-running dump: lock, repair, unlock; the server runs on
	rc=0
	floe_in "$NS1" "$run/lr.json" "$run/lr.err" dump -t "$spid" -D "$run/img-lr" --tcp-established --leave-running --json || rc=$?
	[[ $rc == 0 ]] || die "floe dump --leave-running of $n connections failed (exit $rc): $(cat "$run/lr.err")"
	tab_lr=$(floe_tables "$NS1" | wc -l)
	if ((n > 0)); then
		chk=$(conn_check "$run" "$cpid")
		lr_ok=$(kv ok "$chk")
		[[ $lr_ok == "$n" ]] || warn "after the --leave-running dump of $n connections: $chk"
	fi
	rm -rf -- "$run/img-lr"
	sleep 0.2

	# 2. killing dump: the connections stay in repair mode and locked until the restore
	rc=0
	floe_in "$NS1" "$run/kd.json" "$run/kd.err" dump -t "$spid" -D "$run/img" --tcp-established --json || rc=$?
	[[ $rc == 0 ]] || die "floe dump of $n connections failed (exit $rc): $(cat "$run/kd.err")"
	wait_gone "$spid" || die "server $spid still exists ${GONE_TIMEOUT_S}s after floe dump"
	tab_between=$(floe_tables "$NS1" | wc -l)

	# 3. restore: the connections come back, the lock goes
	rc=0
	floe_in "$NS1" "$run/rs.json" "$run/rs.err" restore -D "$run/img" --tcp-established -d --json || rc=$?
	[[ $rc == 0 ]] || die "floe restore of $n connections failed (exit $rc): $(cat "$run/rs.err")"
	tab_after=$(floe_tables "$NS1" | wc -l)
	if [[ -e /proc/$spid && $(tr '\0' ' ' <"/proc/$spid/cmdline" 2>/dev/null) == *tcpmany\ server* ]]; then
		rs_pid_ok=yes
	else
		rs_pid_ok=no
		warn "the restored server is not running as pid $spid"
	fi
	if ((n > 0)); then
		rs_chk=$(conn_check "$run" "$cpid")
		rs_ok=$(kv ok "$rs_chk")
		[[ $rs_ok == "$n" ]] || warn "after dump + restore of $n connections: $rs_chk"
	fi
	kill_ns_except "$NS1"
	rm -rf -- "$run/img"

	lr_tim=$(python3 "$WORK/timings.py" "$run/lr.json" "${DUMP_KEYS[@]}")
	kd_tim=$(python3 "$WORK/timings.py" "$run/kd.json" "${DUMP_KEYS[@]}")
	rs_tim=$(python3 "$WORK/timings.py" "$run/rs.json" "${RESTORE_KEYS[@]}")
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$n" "$lr_tim" "$kd_tim" "$rs_tim" "$lr_ok" \
		"$rs_ok" "$rs_pid_ok" "$tab_lr" "$tab_between" "$tab_after" "$(kv max_ms "$rs_chk")" >>"$RES_A"
	log "tcp-bench:   A run $rep, $n connections: lock+repair+unlock $(awk -F'\t' '{ printf "%.3f", $6 + $7 + $8 }' <<<"$lr_tim") ms, frozen $(cut -f5 <<<"$lr_tim") ms; after restore ${rs_ok} ok"
}

if ((RUN_A)); then
	{
		printf 'rep\tconns'
		for k in "${DUMP_KEYS[@]}"; do printf '\tlr_%s' "$k"; done
		for k in "${DUMP_KEYS[@]}"; do printf '\tkd_%s' "$k"; done
		for k in "${RESTORE_KEYS[@]}"; do printf '\trs_%s' "$k"; done
		printf '\tlr_conns_ok\trs_conns_ok\trs_same_pid\ttables_after_lr\ttables_after_dump\ttables_after_restore\trs_echo_max_ms\n'
	} >"$RES_A"
	ip netns add "$NS1" || die "cannot create network namespace $NS1"
	MY_NS+=("$NS1")
	ip -n "$NS1" link set lo up
	log "tcp-bench: part A: $CONNS idle connections vs none, $REPEAT run(s), in netns $NS1 (127.0.0.1)"
	for ((rep = 1; rep <= REPEAT; rep++)); do
		# alternate the order between runs
		if ((rep % 2 == 1)); then order=(0 "$CONNS"); else order=("$CONNS" 0); fi
		for n in "${order[@]}"; do a_once "$rep" "$n"; done
	done
fi

# =========================================================== part B ===
B_DONE=0
if ((RUN_B)) && [[ -z $B_SKIP ]]; then
	printf 'rep\tstatus\tdowntime_ms\tfreeze_ms\tfinal_scan_ms\tfinal_dump_ms\tfinal_transfer_ms\trestore_finish_ms\tresume_ms\ttotal_ms\tprecopy_ms\titerations\tconverged\tmemory_bytes\twire_bytes\tgap_before_ms\tgap_after_ms\tops_before\tops_after\terrors\twrong\tlast_error\tretrans_before\tretrans_after\tclient_rto_ms\tredis_on_a\tredis_on_b\ttables_a\ttables_b\taddr_on_b\twarnings\tmessages\n' >"$RES_B"

	# ---- the LAN: three hosts on a bridge in a fourth ("switch") namespace, MTU 1500
	for ns in $LAN_S $LAN_A $LAN_B $LAN_C; do
		ip netns add "$ns" || die "cannot create network namespace $ns"
		MY_NS+=("$ns")
	done
	ip -n "$LAN_S" link set lo up
	ip -n "$LAN_S" link add "$BRIDGE" mtu 1500 type bridge stp_state 0 || die "cannot create bridge $BRIDGE"
	ip -n "$LAN_S" link set "$BRIDGE" up
	for h in a b c; do
		case $h in
		a) ns=$LAN_A if=$IF_A port=$PORT_A addr=$IP_A ;;
		b) ns=$LAN_B if=$IF_B port=$PORT_B addr=$IP_B ;;
		c) ns=$LAN_C if=$IF_C port=$PORT_C addr=$IP_C ;;
		esac
		ip link add "$if" netns "$ns" mtu 1500 type veth peer name "$port" netns "$LAN_S" mtu 1500 ||
			die "cannot create the veth pair of host $h"
		ip -n "$LAN_S" link set "$port" master "$BRIDGE"
		ip -n "$LAN_S" link set "$port" up
		ip -n "$ns" link set lo up
		ip -n "$ns" addr add "$addr/24" dev "$if"
		ip -n "$ns" link set "$if" up
	done
	for pair in "$LAN_A $IP_B" "$LAN_A $IP_C" "$LAN_B $IP_C"; do
		read -r ns to <<<"$pair"
		ok=0
		for ((i = 0; i < 100; i++)); do
			if nsenter --net="/run/netns/$ns" ping -c1 -W1 -q "$to" >/dev/null 2>&1; then
				ok=1
				break
			fi
			sleep 0.1
		done
		((ok)) || die "$ns cannot ping $to"
	done
	if [[ -n $CLIENT_RTO_MIN ]]; then
		ip -n "$LAN_C" route replace "$SUBNET.0/24" dev "$IF_C" proto kernel scope link src "$IP_C" rto_min "$CLIENT_RTO_MIN" ||
			die "cannot set rto_min $CLIENT_RTO_MIN on host c's route"
	fi

	# ---- agents in a and b
	agent_configs "$WORK" "$FLOE" "$HOSTA" "$IP_A" "$HOSTB" "$IP_B"
	spawn "$LAN_A" "$WORK/agent-a.log" "$AGENT" -c "$WORK/a.toml"
	AGENT_A=$SPAWNED
	PIDS+=("$AGENT_A")
	spawn "$LAN_B" "$WORK/agent-b.log" "$AGENT" -c "$WORK/b.toml"
	AGENT_B=$SPAWNED
	PIDS+=("$AGENT_B")
	for h in a b; do
		if ! wait_file "$WORK/$h.sock" "$START_TIMEOUT_S"; then
			tail -n 30 "$WORK/agent-$h.log" >&2 || true
			die "agent $h did not create its control socket within ${START_TIMEOUT_S}s"
		fi
	done
	log "tcp-bench: part B: LAN $SUBNET.0/24 (bridge $BRIDGE in $LAN_S, MTU 1500): a $IP_A ($HOSTA), b $IP_B ($HOSTB), client c $IP_C; service address $SIP"

	# ---- helpers
	# JSON events of one `floe migrate --json` -> TSV fragment: status .. wire_bytes, warnings, messages
	cat >"$WORK/events.py" <<'EOF'
import json, sys
report, error, warnings = None, "", []
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
clean = lambda s: " ".join(str(s).split()).replace("\t", " ")
if report is None:
    if not error:
        error = clean(open(sys.argv[2], errors="replace").read())[-400:] or "no report and no error event"
    print("\t".join(["failed"] + ["nan"] * 13), str(len(warnings)), clean(error), sep="\t")
    sys.exit(0)
d = report["downtime"]
vals = ["ok", d["total_ms"], d["freeze_ms"], d["final_scan_ms"], d["final_dump_ms"], d["final_transfer_ms"],
        d["restore_finish_ms"], d["resume_ms"], report["total_ms"], report["precopy_ms"], report["iterations"],
        str(report["converged"]).lower(), report["memory_bytes"], report["wire_bytes"]]
print("\t".join(str(v) for v in vals), str(len(warnings)), clean("; ".join(warnings)), sep="\t")
EOF

	# client_stats DIR PID -> the redis client's stats line (count= max_gap_ms= errors= wrong= last_error=)
	client_stats() {
		if kill -0 "$2" 2>/dev/null; then
			rm -f -- "$1/stats"
			kill -USR1 "$2" 2>/dev/null || true
			wait_file "$1/stats" "$STATS_TIMEOUT_S" || warn "the redis client wrote no stats within ${STATS_TIMEOUT_S}s"
		fi
		cat "$1/stats" 2>/dev/null || echo "count=nan max_gap_ms=nan errors=nan wrong=nan last_error=no-stats"
	}
	# client_tcp -> "RETRANS RTO_MS" of the client's connection to the service (ss -ti: total
	# retransmitted segments so far, which ss omits while it is 0; current retransmission
	# timeout); "nan nan" if the connection is not found
	client_tcp() {
		local line r t
		line=$({ nsenter --net="/run/netns/$LAN_C" ss -tinH state established dst "$SIP:$REDIS_PORT" 2>/dev/null || true; } | tr '\n' ' ')
		printf '%s\n' "$line" >>"$RUN_B_DIR/ss.txt"
		if [[ $line != *rto:* ]]; then
			echo "nan nan"
			return 0
		fi
		r=$(grep -o 'retrans:[0-9]*/[0-9]*' <<<"$line" | head -n1 || true)
		t=$(grep -o ' rto:[0-9.]*' <<<"$line" | head -n1 || true)
		r=${r##*/} t=${t##*:}
		echo "${r:-0} ${t:-nan}"
	}
	redis_answers() { # from host c, through the service address
		nsenter --net="/run/netns/$LAN_C" timeout 2 bash -c \
			"exec 3<>/dev/tcp/$SIP/$REDIS_PORT && printf 'PING\r\n' >&3 && IFS= read -r l <&3 && [[ \$l == +PONG* ]]" 2>/dev/null
	}
	tail_agents() {
		local h
		for h in a b; do
			log "---- last lines of agent $h's log ($WORK/agent-$h.log)"
			tail -n 25 "$WORK/agent-$h.log" >&2 || true
		done
	}

	# b_once REP
	b_once() {
		local rep=$1 rpid cpid rc=0 row before after rb ra rto on_a on_b ta tb addr_b
		RUN_B_DIR=$WORK/b-$rep
		local run=$RUN_B_DIR
		mkdir -p "$run/redis" "$run/client"
		# the service address on a, announced (a previous run left it on b)
		ip -n "$LAN_B" addr del "$SIP/24" dev "$IF_B" 2>/dev/null || true
		ip -n "$LAN_A" addr add "$SIP/24" dev "$IF_A" || die "cannot add $SIP/24 on host a"
		if ((HAVE_ARPING)); then
			nsenter --net="/run/netns/$LAN_A" arping -U -c1 -w1 -I "$IF_A" "$SIP" >/dev/null 2>&1 || true
		else
			ip -n "$LAN_C" neigh flush to "$SIP" dev "$IF_C" 2>/dev/null || true
		fi
		spawn "$LAN_A" "$run/redis/log" redis-server --port "$REDIS_PORT" --bind 0.0.0.0 --protected-mode no \
			--save '' --appendonly no --daemonize no --dir "$run/redis"
		rpid=$SPAWNED
		local i
		for ((i = 0; i < START_TIMEOUT_S * 20; i++)); do
			redis_answers && break
			kill -0 "$rpid" 2>/dev/null || die "redis-server exited at start: $(tail -n 20 "$run/redis/log")"
			sleep 0.05
		done
		redis_answers || die "redis does not answer on $SIP:$REDIS_PORT from host c"
		spawn "$LAN_C" "$run/client/err" python3 "$REPO/tests/scripts/redisclient.py" "$SIP" "$REDIS_PORT" \
			"$run/client" "$REDIS_MB"
		log "tcp-bench:   B run $rep: redis pid $rpid in a; the client loads $REDIS_MB MB"
		wait_file "$run/client/ready" "$LOAD_TIMEOUT_S" ||
			die "the redis client did not load its data within ${LOAD_TIMEOUT_S}s: $(tail -n 5 "$run/client/err")"
		cpid=$(sed -n 's/^pid=//p' "$run/client/ready")
		[[ $cpid =~ ^[0-9]+$ ]] || die "bad ready file $run/client/ready"
		sleep "$SETTLE_S"
		before=$(client_stats "$run/client" "$cpid")
		read -r rb rto < <(client_tcp)
		[[ $(kv errors "$before") == 0 ]] || die "the redis client failed before the migration: $before"
		log "tcp-bench:   B run $rep: floe migrate $rpid --to $HOSTB -n --tcp-established --move-address $SIP/24 --json $MIGRATE_ARGS"
		# shellcheck disable=SC2086 # MIGRATE_ARGS is a word list on purpose
		FLOE_AGENT_SOCKET=$WORK/a.sock timeout "$MIGRATE_TIMEOUT_S" "$FLOE" migrate "$rpid" --to "$HOSTB" -n \
			--tcp-established --move-address "$SIP/24" --json $MIGRATE_ARGS \
			>"$run/events.jsonl" 2>"$run/migrate.err" || rc=$?
		sleep "$AFTER_S"
		after=$(client_stats "$run/client" "$cpid")
		read -r ra _ < <(client_tcp)
		ip -n "$LAN_C" neigh show to "$SIP" >"$run/neigh.txt" 2>&1 || true
		row=$(python3 "$WORK/events.py" "$run/events.jsonl" "$run/migrate.err") || die "cannot parse $run/events.jsonl"
		if [[ ${row%%$'\t'*} != ok || $rc != 0 ]]; then
			warn "migration $rep failed (exit $rc): $(awk -F'\t' '{ print $NF }' <<<"$row")"
			tail_agents
		fi
		on_a=$(pids_in "$LAN_A" redis-server | wc -l)
		on_b=$(pids_in "$LAN_B" redis-server | wc -l)
		ta=$(floe_tables "$LAN_A" | wc -l)
		tb=$(floe_tables "$LAN_B" | wc -l)
		addr_b=no
		ip -n "$LAN_B" -o addr show to "$SIP" | grep -q . && addr_b=yes
		((ta + tb == 0)) || warn "floe_ nftables tables left after migration $rep: a: $(floe_tables "$LAN_A" | tr '\n' ' ') b: $(floe_tables "$LAN_B" | tr '\n' ' ')"
		kill_ns_except "$LAN_C"
		kill_ns_except "$LAN_B" "$AGENT_B"
		kill_ns_except "$LAN_A" "$AGENT_A"
		local fields
		fields=$(cut -f1-14 <<<"$row")
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$fields" \
			"$(kv max_gap_ms "$before")" "$(kv max_gap_ms "$after")" "$(kv count "$before")" "$(kv count "$after")" \
			"$(kv errors "$after")" "$(kv wrong "$after")" "$(kv last_error "$after")" "$rb" "$ra" "$rto" \
			"$on_a" "$on_b" "$ta" "$tb" "$addr_b" "$(cut -f15 <<<"$row")" "$(cut -f16- <<<"$row")" >>"$RES_B"
		log "tcp-bench:   B run $rep: downtime $(cut -f2 <<<"$row") ms; client gap before $(kv max_gap_ms "$before") ms, after $(kv max_gap_ms "$after") ms, errors $(kv errors "$after"), wrong $(kv wrong "$after")"
	}

	for ((rep = 1; rep <= REPEAT; rep++)); do b_once "$rep"; done
	B_DONE=1
fi

if [[ -n $RESULTS_TSV ]]; then
	if ((RUN_A)); then cp -- "$RES_A" "$RESULTS_TSV" || die "cannot write $RESULTS_TSV"; fi
	if ((B_DONE)); then cp -- "$RES_B" "${RESULTS_TSV%.*}.redis.tsv" || die "cannot write ${RESULTS_TSV%.*}.redis.tsv"; fi
fi

# ----------------------------------------------------------------- report ---
echo
echo "machine: $(uname -r), $(nproc) cpu(s), $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
echo "         load average at start $LOAD0, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "floe:    $FLOE_BIN_DIR ($FLOE_REV)  REPEAT=$REPEAT"
if ((B_DONE)); then
	echo "part B:  $(redis-server --version | cut -d' ' -f3) client tests/scripts/redisclient.py ($REDIS_MB MB), LAN MTU 1500, arping $( ((HAVE_ARPING)) && echo yes || echo no)${CLIENT_RTO_MIN:+, client rto_min $CLIENT_RTO_MIN}  MIGRATE_ARGS='$MIGRATE_ARGS'"
fi
BENCH_LIB="$REPO/bench" python3 - "$RUN_A" "$RES_A" "$CONNS" "$LOCK_TARGET_MS" "$B_DONE" "$RES_B" "$GAP_TARGET_MS" "${B_SKIP:-}" "$RUN_B" <<'EOF'
import csv, os, sys
sys.path.insert(0, os.environ["BENCH_LIB"])
import report
from report import f, fmt, med, mr
report.SPEC = ".3f"

run_a, res_a, conns, lock_target = sys.argv[1] == "1", sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
b_done, res_b, gap_target, b_skip, run_b = sys.argv[5] == "1", sys.argv[6], float(sys.argv[7]), sys.argv[8], sys.argv[9] == "1"

verdicts = []
if run_a:
    rows = list(csv.DictReader(open(res_a), delimiter="\t"))
    by = {0: [r for r in rows if r["conns"] == "0"], conns: [r for r in rows if r["conns"] == str(conns)]}
    col = lambda n, k: [f(r[k]) for r in by[n]]
    lru = lambda n: [None if any(f(r[k]) is None for k in ("lr_lock_ms", "lr_tcp_repair_ms", "lr_unlock_ms"))
                     else f(r["lr_lock_ms"]) + f(r["lr_tcp_repair_ms"]) + f(r["lr_unlock_ms"]) for r in by[n]]
    print()
    print(f"(A) {conns} idle established connections on 127.0.0.1 vs none, same server (bench/tcpmany.c),")
    print(f"    in a private network namespace; ms, median [min..max] of {len(by[conns])} run(s)")
    print()
    w = 30
    print(f"{'':<{w}} | {'0 connections':>26} | {str(conns) + ' connections':>26} | {'difference':>10} | {'per conn':>8}")
    def line(label, a, b):
        ma, mb = med(a), med(b)
        d = mb - ma if ma is not None and mb is not None else None
        print(f"{label:<{w}} | {mr(a):>26} | {mr(b):>26} | {fmt(d):>10} | {fmt(d / conns * 1000 if d is not None else None, '.1f'):>5} us")
    print("dump --tcp-established --leave-running:")
    for k, label in (("lock_ms", "  lock (nft batch)"), ("tcp_repair_ms", "  TCP_REPAIR read"),
                     ("unlock_ms", "  unlock (delete table)")):
        line(label, col(0, "lr_" + k), col(conns, "lr_" + k))
    line("  lock + repair + unlock", lru(0), lru(conns))
    for k in ("freeze_ms", "collect_ms", "frozen_ms", "total_ms"):
        line("  " + k, col(0, "lr_" + k), col(conns, "lr_" + k))
    print("dump --tcp-established (killed):")
    for k in ("lock_ms", "tcp_repair_ms", "collect_ms", "frozen_ms", "total_ms"):
        line("  " + k, col(0, "kd_" + k), col(conns, "kd_" + k))
    print("restore --tcp-established -d:")
    for k in ("create_ms", "finish_ms", "unlock_ms", "total_ms"):
        line("  " + k, col(0, "rs_" + k), col(conns, "rs_" + k))
    print()
    for r in by[conns]:
        print(f"  run {r['rep']}: connections working after the --leave-running dump {r['lr_conns_ok']}/{conns}, "
              f"after dump + restore {r['rs_conns_ok']}/{conns} (all echoed within {fmt(f(r['rs_echo_max_ms']), '.1f')} ms); "
              f"restored with the same pid: {r['rs_same_pid']}; floe_ tables after the leave-running dump "
              f"{r['tables_after_lr']}, between dump and restore {r['tables_after_dump']}, after restore {r['tables_after_restore']}")
    bad = [r for r in rows if r["rs_same_pid"] != "yes" or r["tables_after_lr"] not in ("0", "")
           or r["tables_after_restore"] not in ("0", "")
           or (r["conns"] != "0" and (r["lr_conns_ok"] != str(conns) or r["rs_conns_ok"] != str(conns)))]
    cost = med(lru(conns))
    worst = max((x for x in lru(conns) if x is not None), default=None)
    print()
    if cost is None:
        verdicts.append(f"FAIL  lock + TCP_REPAIR + unlock of {conns} connections <= {lock_target:g} ms: not measured")
    else:
        verdicts.append(f"{'PASS' if cost <= lock_target else 'FAIL'}  lock + TCP_REPAIR + unlock of {conns} connections "
                        f"<= {lock_target:g} ms: {cost:.3f} ms (median; worst {worst:.3f} ms)")
    works = all(r["rs_conns_ok"] == str(conns) for r in by[conns]) and by[conns]
    verdicts.append(f"{'PASS' if works else 'FAIL'}  every connection works after dump + restore: "
                    + ", ".join(f"{r['rs_conns_ok']}/{conns}" for r in by[conns]))
    if bad:
        verdicts.append("WARNING: part A: a restored server had another pid, a connection failed or a floe_ table was left (see above)")

if b_done:
    rows = list(csv.DictReader(open(res_b), delimiter="\t"))
    ok = [r for r in rows if r["status"] == "ok"]
    print()
    print("(B) redis live migration a -> b with --tcp-established --move-address, client in host c")
    print()
    print("run | downtime ms (freeze / final scan / final dump / final transfer / restore finish / resume) | total ms | iter | "
          "MiB | client gap ms: before / after | ops in window | errors | wrong | client retransmits | client RTO ms")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['rep']:>3} | FAILED: {r['messages']} | client: gap after {r['gap_after_ms']} ms, errors {r['errors']}, "
                  f"wrong {r['wrong']}, {r['last_error']}")
            continue
        parts = " / ".join(fmt(f(r[k]), ".1f") for k in ("freeze_ms", "final_scan_ms", "final_dump_ms",
                                                           "final_transfer_ms", "restore_finish_ms", "resume_ms"))
        rt = "-"
        if f(r["retrans_before"]) is not None and f(r["retrans_after"]) is not None:
            rt = f"{int(f(r['retrans_after']) - f(r['retrans_before']))}"
        print(f"{r['rep']:>3} | {fmt(f(r['downtime_ms']), '.1f'):>7} ({parts}) | {fmt(f(r['total_ms']), '.0f'):>8} | "
              f"{r['iterations']:>4} | {fmt(f(r['memory_bytes']) / 2**20 if f(r['memory_bytes']) else None, '.0f'):>3} | "
              f"{fmt(f(r['gap_before_ms']), '.1f'):>6} / {fmt(f(r['gap_after_ms']), '.1f'):>6} | "
              f"{fmt(f(r['ops_after']) - f(r['ops_before']) if f(r['ops_after']) is not None and f(r['ops_before']) is not None else None, '.0f'):>13} | "
              f"{r['errors']:>6} | {r['wrong']:>5} | {rt:>18} | {fmt(f(r['client_rto_ms']), '.0f'):>13}")
    for r in rows:
        notes = []
        if r["redis_on_b"] != "1" or r["redis_on_a"] != "0":
            notes.append(f"redis processes on a: {r['redis_on_a']}, on b: {r['redis_on_b']}")
        if r["tables_a"] != "0" or r["tables_b"] != "0":
            notes.append(f"floe_ tables left: a {r['tables_a']}, b {r['tables_b']}")
        if r["addr_on_b"] != "yes":
            notes.append("the service address is not on b")
        if f(r["gap_before_ms"]) is not None and f(r["gap_after_ms"]) is not None and f(r["gap_after_ms"]) <= f(r["gap_before_ms"]):
            notes.append("the longest gap came before the migration (gap after <= before: the migration's own gap is smaller)")
        if r["status"] == "ok" and r["warnings"] not in ("0", ""):
            notes.append(f"{r['warnings']} warning(s): {r['messages']}")
        if notes:
            print(f"  run {r['rep']}: " + "; ".join(notes))
    dts = [f(r["downtime_ms"]) for r in ok]
    gaps = [f(r["gap_after_ms"]) for r in rows]
    print()
    print(f"downtime {mr(dts, '.1f')} ms; client's longest gap {mr(gaps, '.1f')} ms "
          f"(before the migration: {mr([f(r['gap_before_ms']) for r in rows], '.1f')} ms)")
    rel = []
    for r in ok:
        ga, dt, rb, ra = f(r["gap_after_ms"]), f(r["downtime_ms"]), f(r["retrans_before"]), f(r["retrans_after"])
        if ga is None or dt is None:
            continue
        why = "?" if rb is None or ra is None else ("client retransmitted" if ra > rb else "no retransmission")
        rel.append(f"run {r['rep']} {ga - dt:+.1f} ms ({why})")
    if rel:
        print("client's longest gap minus downtime: " + ", ".join(rel))
    g = med(gaps)
    clean = bool(rows) and len(ok) == len(rows) and all(r["errors"] == "0" and r["wrong"] == "0" for r in rows)
    if g is None or not ok:
        verdicts.append(f"FAIL  redis client's longest gap during migration <= {gap_target:g} ms: not measured")
    else:
        verdicts.append(f"{'PASS' if g <= gap_target else 'FAIL'}  redis client's longest gap during migration <= {gap_target:g} ms: "
                        f"{g:.1f} ms (median; worst {max(x for x in gaps if x is not None):.1f} ms)")
    verdicts.append(f"{'PASS' if clean else 'FAIL'}  redis migrations succeed with no client error and no wrong reply: "
                    + ", ".join(f"{r['status']} {r['errors']}/{r['wrong']}" for r in rows))
elif run_b:
    verdicts.append(f"SKIPPED  part B: {b_skip}")

print()
for v in verdicts:
    print(v)
EOF
