# shellcheck shell=bash
# Shell functions shared by the benchmarks (sourced, not run).

# wait_gone PID [SECONDS] -> 0 once /proc/PID is gone, 1 after the timeout
# (default: $GONE_TIMEOUT_S of the sourcing script)
wait_gone() {
	local pid=$1 limit=${2:-$GONE_TIMEOUT_S} i
	for ((i = 0; i < limit * 50; i++)); do
		[[ -e /proc/$pid ]] || return 0
		sleep 0.02
	done
	return 1
}

# kill_ns_except NS [KEEP_PID]: SIGKILL everything in network namespace NS but KEEP_PID, and
# wait until it is gone (the sourcing script's warn says what outlived GONE_TIMEOUT_S)
kill_ns_except() {
	local p victims=()
	for p in $(ip netns pids "$1" 2>/dev/null); do
		[[ $p == "${2:-}" ]] || victims+=("$p")
	done
	for p in "${victims[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	for p in "${victims[@]}"; do
		wait_gone "$p" || warn "pid $p in $1 still present ${GONE_TIMEOUT_S}s after SIGKILL"
	done
}

# wait_file FILE SECONDS -> 0 once FILE exists
wait_file() {
	local i
	for ((i = 0; i < $2 * 50; i++)); do
		[[ -e $1 ]] && return 0
		sleep 0.02
	done
	return 1
}

# agent_configs WORK FLOE HOSTA IPA HOSTB IPB
# A throwaway cluster CA and a certificate per agent in WORK/pki, and the
# agents' configurations WORK/a.toml and WORK/b.toml (each lists the other
# as its only peer; control sockets WORK/a.sock and WORK/b.sock).
agent_configs() {
	local work=$1 floe=$2 hosta=$3 ipa=$4 hostb=$5 ipb=$6 h name addr peer peerip
	"$floe" certs init --dir "$work/pki" >/dev/null || die "floe certs init failed"
	"$floe" certs issue "$hosta" --san "$ipa" --dir "$work/pki" >/dev/null || die "floe certs issue $hosta failed"
	"$floe" certs issue "$hostb" --san "$ipb" --dir "$work/pki" >/dev/null || die "floe certs issue $hostb failed"
	for h in a b; do
		if [[ $h == a ]]; then
			name=$hosta addr=$ipa peer=$hostb peerip=$ipb
		else
			name=$hostb addr=$ipb peer=$hosta peerip=$ipa
		fi
		cat >"$work/$h.toml" <<EOT
name = "$name"
listen = "$addr:7420"
control_socket = "$work/$h.sock"
data_dir = "$work/data-$h"
ca = "$work/pki/ca.pem"
cert = "$work/pki/$name.pem"
key = "$work/pki/$name.key"
allowed_peers = ["$peer"]
log = "info"
[peers]
"$peer" = "$peerip:7420"
EOT
	done
}

# ------------------------------------------------------------------------------------------
# What the single-host benchmarks (run.sh, tree.sh, redis.sh, incremental.sh) share. Each sets
# BENCH_NAME, the prefix of its messages, before it sources this file. The functions below use
# that script's REPO, WORK, KEEP, BENCH_TMP, FLOE, BASELINE, WARM, GONE_TIMEOUT_S and
# CHECK_TIMEOUT_S; the EXIT trap (make_work) calls its cleanup_procs. Scripts that define log,
# die, kv or close_inherited_fds themselves (migrate.sh, tcp.sh) override these.

log() { printf '%s\n' "$*" >&2; }
die() {
	log "${BENCH_NAME:-bench}: ERROR: $*"
	exit 1
}
now() { date +%s.%N; }
# sub T1 T0 -> T1-T0 in seconds, 6 decimals
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", a - b }'; }
# kv KEY "k1=v1 k2=v2 ..." -> value of KEY (empty if absent)
kv() {
	awk -v k="$1=" '{ for (i = 1; i <= NF; i++) if (index($i, k) == 1) { print substr($i, length(k) + 1); exit } }' <<<"$2"
}

# need_cmds CMD... : die unless every CMD is on PATH
need_cmds() {
	local c
	for c in "$@"; do
		command -v "$c" >/dev/null || die "$c is required"
	done
}

# need_posint VAR... : die unless every variable VAR holds a positive integer
need_posint() {
	local v
	for v in "$@"; do
		[[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
	done
}

# make_work NAME -> WORK=BENCH_TMP/NAME.XXXXXX with a bin/ directory, RESULTS=WORK/results.tsv;
# from now on the EXIT trap (bench_cleanup) cleans up, INT and TERM exit with 130 and 143
# shellcheck disable=SC2034 # RESULTS is the caller's
make_work() {
	trap bench_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	WORK=$(mktemp -d "$BENCH_TMP/$1.XXXXXX")
	mkdir -p "$WORK/bin"
	RESULTS="$WORK/results.tsv"
}

# bench_cleanup: the EXIT trap: the script's cleanup_procs (kills what it started), then
# remove_work; exits with the script's status
bench_cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	cleanup_procs
	remove_work
	exit "$rc"
}

# remove_work: WORK removed, or kept (and said so) with KEEP=1
remove_work() {
	if [[ -n $WORK && -d $WORK ]]; then
		if [[ $KEEP == 1 ]]; then
			log "$BENCH_NAME: keeping work dir $WORK"
		else
			rm -rf -- "$WORK"
		fi
	fi
}

# build_c NAME SRC [GCC_ARGS...]: gcc -O2 -Wall REPO/SRC into WORK/bin/NAME
build_c() {
	local name=$1 src=$2
	shift 2
	gcc -O2 -Wall -o "$WORK/bin/$name" "$REPO/$src" "$@"
}

# need_floe [HINT]: unless FLOE is set, `cargo build --release -p floe-cli` (on failure: die,
# with HINT) and FLOE=target/release/floe; FLOE_REV says which. Dies unless FLOE is executable.
# shellcheck disable=SC2034,SC2120 # FLOE_REV is the caller's; HINT is optional
need_floe() {
	if [[ -z $FLOE ]]; then
		log "$BENCH_NAME: cargo build --release -p floe-cli"
		(cd "$REPO" && cargo build --release -p floe-cli) || die "cargo build failed${1:+ ($1)}"
		FLOE="${CARGO_TARGET_DIR:-$REPO/target}/release/floe"
		FLOE_REV="built from $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?')"
	else
		FLOE_REV=prebuilt
	fi
	[[ -x $FLOE ]] || die "floe binary not found/executable: $FLOE"
}

# close_inherited_fds: in a subshell, close every descriptor above 2
close_inherited_fds() {
	local f n
	for f in "/proc/$BASHPID/fd/"*; do
		n=${f##*/}
		if [[ $n =~ ^[0-9]+$ ]] && ((n > 2)); then
			exec {n}>&- 2>/dev/null || true
		fi
	done
}

# launch DIR OUT CMD... -> LAUNCHED: CMD started in DIR as a session leader (setsid: floe needs
# no --shell-job; the subshell is not a process-group leader, so setsid execs without forking
# and CMD is our direct child, reaped promptly by bash), with the descriptors above 2 inherited
# from our caller (pipes...) closed, stdin /dev/null, stdout and stderr to OUT. LAUNCHED is
# CMD's pid.
launch() {
	local dir=$1 out=$2
	shift 2
	(
		close_inherited_fds
		cd "$dir" && exec setsid "$@" </dev/null >"$out" 2>&1
	) &
	LAUNCHED=$!
	disown "$LAUNCHED" 2>/dev/null || true # no "Killed" job notices
}

# wait_ready FILE PID SECONDS WHAT OUT: wait until FILE is not empty; die if PID (WHAT, output
# in OUT) exits first or after SECONDS
wait_ready() {
	local file=$1 pid=$2 limit=$3 what=$4 out=$5 deadline=$((SECONDS + $3))
	while [[ ! -s $file ]]; do
		kill -0 "$pid" 2>/dev/null || die "$what exited before becoming ready; log: $(cat "$out" 2>/dev/null)"
		((SECONDS < deadline)) || die "$what not ready after ${limit}s"
		sleep 0.02
	done
}

# wait_answer IS_OURS PID FILE WHAT OUT DEADLINE: after a SIGUSR1 to PID, wait until its answer
# FILE is not empty; die if `IS_OURS PID` fails (WHAT died; output in OUT) or at DEADLINE (a
# value of SECONDS, CHECK_TIMEOUT_S after the signal)
wait_answer() {
	local is_ours=$1 pid=$2 file=$3 what=$4 out=$5 deadline=$6
	while [[ ! -s $file ]]; do
		"$is_ours" "$pid" || die "$what died after SIGUSR1; log: $(tail -n 5 "$out")"
		((SECONDS < deadline)) || die "$what did not answer SIGUSR1 within ${CHECK_TIMEOUT_S}s"
		sleep 0.02
	done
}

# proc_cmdline PID -> the command line of PID, arguments separated by spaces (fails if gone)
proc_cmdline() { tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline"; }

# is_work_bin PID NAME: true if PID runs WORK/bin/NAME
is_work_bin() {
	local cmd
	cmd=$(proc_cmdline "$1") || return 1
	[[ -n $WORK && $cmd == "$WORK/bin/$2 "* ]]
}

# stat_field PID N -> field N of /proc/PID/stat after the command name (1 state, 2 ppid, 4 sid)
stat_field() { awk -v n="$2" '{ sub(/^.*\) /, ""); print $n }' "/proc/$1/stat"; }

# need_session_leader PID WHAT: die unless PID (WHAT) leads its own session
need_session_leader() {
	local sid
	sid=$(stat_field "$1" 4)
	[[ $sid == "$1" ]] || die "$2 $1 is not a session leader (sid $sid)"
}

# wait_all_gone PID... -> 0 once every /proc/PID is gone, 1 after GONE_TIMEOUT_S
wait_all_gone() {
	local deadline=$((SECONDS + GONE_TIMEOUT_S)) p left
	while :; do
		left=0
		for p in "$@"; do
			[[ -e /proc/$p ]] && left=1 && break
		done
		((left)) || return 0
		((SECONDS < deadline)) || return 1
		sleep 0.02
	done
}

# kill_ours IS_OURS PID... -> KILLED: SIGKILL every PID for which `IS_OURS PID` holds (KILLED
# lists them) and wait until they are gone; 1 if some are still there after GONE_TIMEOUT_S
kill_ours() {
	local is_ours=$1 p
	shift
	KILLED=()
	for p in "$@"; do
		if "$is_ours" "$p"; then
			kill -KILL "$p" 2>/dev/null || true
			KILLED+=("$p")
		fi
	done
	((${#KILLED[@]} == 0)) || wait_all_gone "${KILLED[@]}"
}

# warm_up BYTES: untimed, with WARM=1: fault in and free BYTES of anonymous memory, so the next
# timed phase runs on pages the hypervisor has backed (README "Noise")
warm_up() {
	if [[ $WARM == 1 ]]; then
		"$BASELINE" touch "$1" >/dev/null || die "warm-up touch failed"
	fi
}

# baseline_restore BYTES DIR -> B_FILL B_TOUCH: `baseline restore` of DIR/baseline.pages (BYTES
# of it), which is removed afterwards
# shellcheck disable=SC2034 # B_FILL and B_TOUCH are the caller's
baseline_restore() {
	local out
	out=$("$BASELINE" restore "$1" "$2/baseline.pages") || die "baseline restore failed"
	B_FILL=$(kv fill_s "$out")
	B_TOUCH=$(kv touch_s "$out")
	[[ -n $B_FILL && -n $B_TOUCH ]] || die "unexpected baseline restore output: '$out'"
	rm -f -- "$2/baseline.pages"
}

# timed OUT CMD... -> RUN_S (wall seconds of CMD), RUN_RC (its exit status); CMD's stdout goes
# to OUT.json, its stderr to OUT.err
# shellcheck disable=SC2034 # RUN_S is the caller's
timed() {
	local out=$1 t0 t1
	shift
	RUN_RC=0
	t0=$(now)
	"$@" >"$out.json" 2>"$out.err" || RUN_RC=$?
	t1=$(now)
	RUN_S=$(sub "$t1" "$t0")
}

# run_failed WHAT OUT: die with "WHAT failed (rc RUN_RC)" and the last 30 lines of OUT.err
run_failed() {
	die "$1 failed (rc $RUN_RC); stderr:
$(tail -n 30 "$2.err")"
}

# json_field FILE KEY -> top-level scalar KEY of the first JSON object in FILE
json_field() {
	python3 - "$1" "$2" <<'EOF' 2>/dev/null || true
import json, sys
text = open(sys.argv[1], errors="replace").read()
dec = json.JSONDecoder()
obj = None
try:
    obj = json.loads(text)
except ValueError:
    for i, c in enumerate(text):
        if c == "{":
            try:
                obj = dec.raw_decode(text, i)[0]
                break
            except ValueError:
                pass
if isinstance(obj, dict) and isinstance(obj.get(sys.argv[2]), (int, str)):
    print(obj[sys.argv[2]])
EOF
}

# check_json_pid FILE PID: die if floe's --json output in FILE names a pid other than PID
check_json_pid() {
	local jpid
	jpid=$(json_field "$1" pid)
	[[ -z $jpid || $jpid == "$2" ]] || die "floe restore reports pid $jpid, expected $2"
}

load_avg() { cut -d' ' -f1-3 /proc/loadavg; }

# note_load -> LOAD0, the load averages at the start; a warning when the first is above 0.5
note_load() {
	LOAD0=$(load_avg)
	if awk -v l="${LOAD0%% *}" 'BEGIN { exit !(l > 0.5) }'; then
		log "$BENCH_NAME: warning: load average is $LOAD0 -- other work on this machine adds noise"
	fi
}

thp_mode() { cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo '?'; }
# work_fs -> "FSTYPE on DEVICE" of WORK
work_fs() { echo "$(stat -f -c %T "$WORK") on $(df --output=source "$WORK" | tail -n1)"; }

# machine_info: the "machine:" lines of a report (kernel, CPUs, THP, work dir, load averages)
machine_info() {
	echo "machine: $(uname -r), $(nproc) cpu(s), $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
	echo "         THP $(thp_mode), work dir fs $(work_fs)"
	echo "         load average at start $LOAD0, at end $(load_avg)"
}
