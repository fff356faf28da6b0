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
