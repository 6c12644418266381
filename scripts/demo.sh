#!/usr/bin/env bash
# Quickstart demo: sets everything up (.venv, every dependency pinned by constraints.txt), runs every example
# in examples/ with `pyflyte run` on local warm replica processes (printing each result), then prints a
# cold-vs-warm timing of one trivial actor task. Takes about a minute once the install is done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

echo "== setting up .venv (scripts/bootstrap.sh: pinned by constraints.txt)"
bash scripts/bootstrap.sh
PY=$ROOT/.venv/bin/python
PYFLYTE=$ROOT/.venv/bin/pyflyte
# bytecode for this repo's code too (the venv itself is compiled by the bootstrap)
"$PY" -m compileall -q flytekitplugins_actor plugin_backend examples bench >/dev/null 2>&1 || true

LOGS=${TMPDIR:-/tmp}/flyte-actor-logs
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

# run <file> <workflow> [args...]: pyflyte run examples/<file> <workflow> [args...]; prints the result
run() {
  local file=$1 wf=$2
  shift 2
  echo
  local shown="" a
  for a in "$@"; do
    case $a in
      *[!A-Za-z0-9_./=-]*) shown+=" '$a'" ;;
      *) shown+=" $a" ;;
    esac
  done
  echo "\$ pyflyte run examples/$file $wf$shown"
  local start end pid rc=0
  start=$(date +%s.%N)
  "$PYFLYTE" run "examples/$file" "$wf" "$@" >"$OUT" 2>&1 &
  pid=$!
  wait "$pid" || rc=$?
  end=$(date +%s.%N)
  if [ "$rc" -ne 0 ]; then
    cat "$OUT"
    echo "FAILED (exit $rc); replica logs: $LOGS/$pid/" >&2
    exit "$rc"
  fi
  local result
  result=$(grep -v '^Running Execution on local.$' "$OUT" | sed '/^[[:space:]]*$/d' | tail -n 1 || true)
  echo "  result : ${result:-(no outputs)}"
  printf '  time   : %.1f s (driver start, replica start, run)\n' "$(echo "$end - $start" | bc)"
  REPLICA_LOGS="$LOGS/$pid"
  local replicas
  replicas=$(ls "$REPLICA_LOGS" 2>/dev/null | sed 's/\.log$//' | tr '\n' ' ' || true)
  if [ -n "$replicas" ]; then
    echo "  replicas: ${replicas}(logs in $REPLICA_LOGS)"
  else
    echo "  replicas: none started (every task result came from flytekit's local cache: cache=True)"
  fi
}

# count <marker>: how many times the last run's replicas printed a marker line
count() { cat "$REPLICA_LOGS"/*.log 2>/dev/null | grep -c "$1" || true; }

echo
echo "== every example, on local warm replicas"
run hello_world.py wf
echo "  say_hello ran on the replica: $(count 'succeeded') execution(s) succeeded there"
run plus_one.py wf --input 0
echo "  4 executions of plus_one, all on one warm replica: $(count 'succeeded') succeeded"
run multiple_tasks.py my_parent_wf --name world
run pod_template.py wf
echo "  COMP_KEY_EX came from the pod template; RUN_KEY_EX set by one task was read by the next (same process)"
run refactoring.py distance_add_wf --point_a '[0, 0]' --point_b '[3, 4]'
run refactoring.py is_even_wf --point_a '[1, 2, 3]'
run caching_map_task.py run_inference
echo "  20 inferences over 2 replicas; 10 s model loads actually run: $(count 'load_model: loading') (at most one per replica)"
run caching_custom_object.py wf
echo "  4 calls with MyObj(state=2); 2 s get_state actually run: $(count 'get_state: computing') (the rest were cache hits)"

echo
echo "== cold vs warm (bench/bench_local.py --demo; full benchmarks: .venv/bin/python bench/bench_local.py)"
"$PY" bench/bench_local.py --demo
