#!/usr/bin/env bash
# A Ray cluster on this machine, laid out as the real ones: a head with no CPUs (GCS, dashboard, job drivers)
# and worker nodes, token auth on, the dashboard / Jobs API on 127.0.0.1. For trying `ray job submit`
# before a real cluster; tests/test_cluster.py runs it with two workers.
#
#   infra/local/ray-cluster.sh       # env: RAY_PORT (6379) RAY_DASHBOARD_PORT (8265) WORKERS (1) WORKER_CPUS (1) RAY_TEMP_DIR
#   RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token ray job submit --working-dir . \
#       --runtime-env infra/runtime_env.yaml -- python jobs/run.py --config configs/smoke.yaml
#
# The dashboard / Jobs API runs any code it is sent (ShadowRay, CVE-2023-48022): it binds 127.0.0.1 here, and
# remote clusters are reached through `kubectl port-forward` or `ray dashboard` (SSH), never a public port.
# Every other per-node port is a free one and each node has its own temp dir (two nodes unpacking the same
# job's working dir into one directory race each other), so the nodes and other Ray instances never collide.
# Worker n (1..WORKERS) has WORKER_CPUS CPUs and the custom resource `worker<n>: 1`, so a sweep can put a trial
# on a given node (`resources.custom: {worker2: 1}`; all nodes here share one IP, so `node:<ip>` cannot tell them apart).
# Stop: kill the process groups it prints (`kill -TERM -- -WORKER... -HEAD`). `ray stop` would stop every Ray
# process on the machine, other people's included.
set -euo pipefail
port="${RAY_PORT:-6379}"
dashboard="${RAY_DASHBOARD_PORT:-8265}"
temp_dir="${RAY_TEMP_DIR:-/tmp/hftlab-ray}"
mkdir -p "$temp_dir"
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0

free_port() { "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
node_ports() {
  local opt
  for opt in --node-manager-port --object-manager-port --dashboard-agent-listen-port \
             --dashboard-agent-grpc-port --runtime-env-agent-port --metrics-export-port; do
    printf '%s %s ' "$opt" "$(free_port)"
  done
}

# shellcheck disable=SC2046  # node_ports is a list of words on purpose
setsid ray start --head --block --port "$port" --num-cpus 0 \
  --dashboard-host 127.0.0.1 --dashboard-port "$dashboard" --ray-client-server-port "$(free_port)" \
  --temp-dir "$temp_dir/h" --disable-usage-stats $(node_ports) > "$temp_dir/head.log" 2>&1 &
head_pid=$!
for _ in $(seq 240); do
  if "${PYTHON:-python3}" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
       "http://127.0.0.1:${dashboard}/api/gcs_healthz" 2> /dev/null; then break; fi
  kill -0 "$head_pid" 2> /dev/null || { cat "$temp_dir/head.log" >&2; exit 1; }
  sleep 0.5
done
workers=()
for n in $(seq "${WORKERS:-1}"); do
  # shellcheck disable=SC2046
  setsid ray start --address "127.0.0.1:${port}" --block --num-cpus "${WORKER_CPUS:-1}" --resources "{\"worker${n}\": 1}" \
    --temp-dir "$temp_dir/w$n" --disable-usage-stats $(node_ports) > "$temp_dir/worker$n.log" 2>&1 &
  workers+=("$!")
done

echo "head_pgid=${head_pid}$(printf ' worker_pgid=%s' "${workers[@]}") dashboard=http://127.0.0.1:${dashboard}"
echo "submit: RAY_ADDRESS=http://127.0.0.1:${dashboard} RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env infra/runtime_env.yaml -- python jobs/run.py --config configs/smoke.yaml"
echo "stop:   kill -TERM --$(printf ' -%s' "${workers[@]}") -${head_pid}"
