#!/usr/bin/env bash
# Regenerates every figure in BENCHMARKS.md, in one run (about 16 minutes on
# the development machine): the criterion benches, the throttled-to-death
# simulation, the real-server run against nginx on 127.0.0.1, and the fleet
# runs (a redis-server they start themselves, and nginx). nginx and
# redis-server are installed with apt-get if missing. Output goes to the
# terminal and to target/bench.log.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    echo "== installing nginx"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q && $sudo apt-get install -y -q nginx-light
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if ! command -v redis-server >/dev/null; then
    echo "== installing redis-server"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q && $sudo apt-get install -y -q redis-server
fi

dir=$(mktemp -d)
port=${TOLLGATE_BENCH_PORT:-18089}
fleet_port=$((port + 1))
echo ok > "$dir/ok.txt"
sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@FLEET_PORT@|$fleet_port|g" scripts/nginx.conf > "$dir/nginx.conf"
"$NGINX" -c "$dir/nginx.conf" -e "$dir/error.log"
trap '"$NGINX" -c "$dir/nginx.conf" -e "$dir/error.log" -s stop || true; rm -rf "$dir"' EXIT

mkdir -p target
{
    echo "== machine"
    nproc; grep -m1 'model name' /proc/cpuinfo || true; rustc --version
    echo "== cargo bench (criterion benches, the simulation, the fleet store)"
    cargo bench --features redis
    echo "== real server: nginx on 127.0.0.1:$port"
    TOLLGATE_SERVER="http://127.0.0.1:$port" cargo bench --features reqwest --bench real_server
    echo "== real server, the learned pace over 20,000 leads"
    sleep 2
    ONLY="teach" LEADS=20000 TOLLGATE_SERVER="http://127.0.0.1:$port" cargo bench --features reqwest --bench real_server
    echo "== a paused connection and the gate's slots (issue 13): the simulation again, and nginx on 127.0.0.1:$port"
    TOLLGATE_SERVER="http://127.0.0.1:$port" cargo bench --features reqwest --bench paused
    echo "== fleet: 4 processes against nginx on 127.0.0.1:$fleet_port (2 connections x 50/s, burst 10)"
    TOLLGATE_SERVER="http://127.0.0.1:$fleet_port" cargo run --release --example fleet --features redis
} 2>&1 | tee target/bench.log
