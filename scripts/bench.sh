#!/usr/bin/env bash
# Regenerates every figure in BENCHMARKS.md, in one run (about 22 minutes on
# the development machine): the criterion benches, the throttled-to-death
# simulation, the real-server runs on 127.0.0.1 against nginx (a leaky
# bucket, scripts/nginx.conf) and HAProxy (a sliding window that counts the
# requests it refuses, scripts/haproxy.cfg), 5,000 and 30,000 leads each,
# and the fleet runs (a redis-server they start themselves, and nginx).
# nginx, HAProxy and redis-server are installed with apt-get if missing.
# Output goes to the terminal and to target/bench.log.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    echo "== installing nginx"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q && $sudo apt-get install -y -q nginx-light
    # The package may start a system server on port 80: stop it.
    ($sudo service nginx stop || $sudo /usr/sbin/nginx -s quit) >/dev/null 2>&1 || true
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    echo "== installing haproxy"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q && $sudo apt-get install -y -q haproxy
fi
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
if ! command -v redis-server >/dev/null; then
    echo "== installing redis-server"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q && $sudo apt-get install -y -q redis-server
fi

dir=$(mktemp -d)
port=${TOLLGATE_BENCH_PORT:-18089}
fleet_port=$((port + 1))
haproxy_port=$((port + 2))
echo ok > "$dir/ok.txt"
sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@FLEET_PORT@|$fleet_port|g" scripts/nginx.conf > "$dir/nginx.conf"
sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$haproxy_port|g" scripts/haproxy.cfg > "$dir/haproxy.cfg"
stop_servers() {
    [ -f "$dir/nginx.pid" ] && "$NGINX" -c "$dir/nginx.conf" -e "$dir/error.log" -s stop || true
    [ -f "$dir/haproxy.pid" ] && kill "$(cat "$dir/haproxy.pid")" || true
    rm -rf "$dir"
}
trap stop_servers EXIT
"$NGINX" -c "$dir/nginx.conf" -e "$dir/error.log"
# Daemon mode and the pid file are in the config; as the current user.
"$HAPROXY" -f "$dir/haproxy.cfg"

mkdir -p target
{
    echo "== machine"
    nproc; grep -m1 'model name' /proc/cpuinfo || true; rustc --version
    echo "== cargo bench (criterion benches, the simulation, the fleet store)"
    cargo bench --features redis
    nginx="http://127.0.0.1:$port"
    haproxy="http://127.0.0.1:$haproxy_port"
    echo "== real server: nginx on $nginx, 5,000 leads (5 s at capacity)"
    TOLLGATE_SERVER="$nginx" TOLLGATE_SERVER_KIND=nginx cargo bench --features reqwest --bench real_server
    echo "== real server: HAProxy on $haproxy, 5,000 leads (5 s at capacity)"
    TOLLGATE_SERVER="$haproxy" TOLLGATE_SERVER_KIND=haproxy cargo bench --features reqwest --bench real_server
    # 30 s at capacity: long enough for a learned pace to settle (this
    # replaces the learned pace's 20,000-lead run). The naive client and the
    # cool-down alone (learn_rate(false)) are left out: they wait whole
    # seconds per 429 on their own clock, and against nginx each took
    # minutes for 5,000 leads already.
    skip="naive,learn_rate(false)"
    echo "== real server: nginx on $nginx, 30,000 leads (30 s at capacity; SKIP=$skip: against nginx those took minutes for 5,000 leads)"
    SKIP="$skip" LEADS=30000 TOLLGATE_SERVER="$nginx" TOLLGATE_SERVER_KIND=nginx cargo bench --features reqwest --bench real_server
    echo "== real server: HAProxy on $haproxy, 30,000 leads (30 s at capacity; SKIP=$skip, as against nginx)"
    SKIP="$skip" LEADS=30000 TOLLGATE_SERVER="$haproxy" TOLLGATE_SERVER_KIND=haproxy cargo bench --features reqwest --bench real_server
    echo "== a paused connection and the gate's slots (issue 13): the simulation again, and nginx on 127.0.0.1:$port"
    TOLLGATE_SERVER="http://127.0.0.1:$port" cargo bench --features reqwest --bench paused
    echo "== fleet: 4 processes against nginx on 127.0.0.1:$fleet_port (2 connections x 50/s, burst 10)"
    TOLLGATE_SERVER="http://127.0.0.1:$fleet_port" cargo run --release --example fleet --features redis
} 2>&1 | tee target/bench.log
