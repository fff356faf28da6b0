#!/usr/bin/env bash
# Demo: live-migrate a running process between two "hosts" on this machine.
#
# The hosts are network namespaces joined by a veth pair (10.99.0.1 and
# 10.99.0.2, MTU 9000). Each runs a floe-agent with its own certificate from
# a throwaway cluster CA. A workload in host A appends a numbered line to a
# log every millisecond while rewriting its memory; `floe migrate` moves it
# to host B while it runs. The script then shows that the log has no gap and
# no duplicate, that the memory is intact, and that the process now lives in
# host B's network namespace and no longer in A's.
#
#   sudo scripts/demo.sh            (MIB=512 DIRTY_MIBS=8 to change the workload)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
if [ "$(id -u)" != 0 ]; then echo "run as root (ptrace, network namespaces)" >&2; exit 1; fi
need=()
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v ip >/dev/null || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
MIB=${MIB:-256}
DIRTY_MIBS=${DIRTY_MIBS:-8}
echo "== building floe and floe-agent (release)"
cargo build --release -q -p floe-cli -p floe-agent
FLOE=$REPO/target/release/floe
AGENT=$REPO/target/release/floe-agent
work=$(mktemp -d /tmp/floe-demo.XXXXXX)
NSA=floe-demo-a NSB=floe-demo-b
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
	# Whatever still runs in the two hosts (the migrated workload included).
	for ns in $NSA $NSB; do
		for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
	done
	ip netns del $NSA 2>/dev/null || true
	ip netns del $NSB 2>/dev/null || true
	if [ "${KEEP:-0}" = 1 ]; then echo "work dir kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
ip netns del $NSA 2>/dev/null || true
ip netns del $NSB 2>/dev/null || true
ip netns add $NSA
ip netns add $NSB
ip link add fdemo-a netns $NSA type veth peer name fdemo-b netns $NSB
ip -n $NSA addr add 10.99.0.1/24 dev fdemo-a
ip -n $NSB addr add 10.99.0.2/24 dev fdemo-b
for ns in $NSA $NSB; do
	ip -n $ns link set lo up
	ip -n $ns link set "fdemo-${ns##*-}" mtu 9000 up
done
# nsenter --net: join only the network namespace, so the agents and the
# workload share the rest (ip netns exec would also make a mount namespace).

echo "== cluster CA and host certificates"
"$FLOE" certs init --dir "$work/pki" >/dev/null
"$FLOE" certs issue hosta --san 10.99.0.1 --dir "$work/pki" >/dev/null
"$FLOE" certs issue hostb --san 10.99.0.2 --dir "$work/pki" >/dev/null
for h in a b; do
	ip=10.99.0.1 peer=b peerip=10.99.0.2
	[ $h = b ] && ip=10.99.0.2 peer=a peerip=10.99.0.1
	cat >"$work/$h.toml" <<EOT
name = "host$h"
listen = "$ip:7420"
control_socket = "$work/$h.sock"
data_dir = "$work/data-$h"
ca = "$work/pki/ca.pem"
cert = "$work/pki/host$h.pem"
key = "$work/pki/host$h.key"
allowed_peers = ["host$peer"]
log = "info"
[peers]
host$peer = "$peerip:7420"
EOT
done
# (disowned: their SIGKILL at the end prints no "Killed" job notice)
nsenter --net=/run/netns/$NSA "$AGENT" -c "$work/a.toml" >"$work/agent-a.log" 2>&1 &
pids+=($!)
disown $!
nsenter --net=/run/netns/$NSB "$AGENT" -c "$work/b.toml" >"$work/agent-b.log" 2>&1 &
pids+=($!)
disown $!
for h in a b; do
	for _ in $(seq 100); do [ -S "$work/$h.sock" ] && break; sleep 0.05; done
	[ -S "$work/$h.sock" ] || { cat "$work/agent-$h.log"; echo "agent $h did not start" >&2; exit 1; }
done
echo "== agents running: hosta (10.99.0.1) and hostb (10.99.0.2)"

gcc -O2 -o "$work/migcounter" "$REPO/tests/fixtures/migcounter.c"
mkdir -p "$work/run"
MIGCOUNTER_DIRTY_MIBS=$DIRTY_MIBS nsenter --net=/run/netns/$NSA setsid "$work/migcounter" "$work/run/log" "$MIB" "$work/run" \
	</dev/null >"$work/run/out" 2>&1 &
disown $!
for _ in $(seq 400); do [ -e "$work/run/ready" ] && break; sleep 0.05; done
pid=$(sed -n 's/^pid=//p' "$work/run/ready")
sleep 1
echo "== workload pid $pid in hosta: $MIB MiB, rewriting $DIRTY_MIBS MiB/s, logging every ms"
tail -n 1 "$work/run/log"

echo "== floe migrate $pid --to hostb -n"
FLOE_AGENT_SOCKET=$work/a.sock "$FLOE" migrate "$pid" --to hostb -n
sleep 1
# The copy in a given host: the migcounter of this demo whose network namespace is that host's.
copy_in() {
	local want p
	want=$(stat -Lc %i "/run/netns/$1")
	for p in $(pgrep -x migcounter); do
		if [ "$(stat -Lc %i "/proc/$p/ns/net" 2>/dev/null)" = "$want" ]; then echo "$p"; fi
	done
}
new=$(copy_in $NSB | head -n 1)
old_alive=$(copy_in $NSA | head -n 1)
echo "== after migration"
echo "   copies in hosta: ${old_alive:-none}; in hostb: host pid ${new:-none} (pid $pid inside its pid namespace)"
echo "   command line there: $(tr '\0' ' ' <"/proc/$new/cmdline")"
tail -n 2 "$work/run/log"
kill -USR2 "$new"
for _ in $(seq 100); do [ -e "$work/run/verify" ] && break; sleep 0.05; done
echo "   memory check: $(cat "$work/run/verify")"
python3 - "$work/run/log" <<'PY'
import re, sys
seqs, nets = [], []
for line in open(sys.argv[1]):
    m = re.match(r"seq=(\d+) pid=\d+ host=\S+ ns=(\d+)", line)
    if m:
        seqs.append(int(m.group(1))); nets.append(m.group(2))
gaps = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
moves = [i for i in range(1, len(nets)) if nets[i] != nets[i - 1]]
print(f"   log: {len(seqs)} lines, seq 1..{seqs[-1]}, gaps/duplicates: {gaps or 'none'}, network namespace changed after seq {[seqs[i-1] for i in moves]}")
PY
[ -z "$old_alive" ] && [ -n "$new" ] && echo "== OK: the process runs on hostb only"
