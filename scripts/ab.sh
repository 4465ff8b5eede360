#!/usr/bin/env bash
# Compares two builds of microseg back to back: runs `BINARY bench ARGS...` for each binary in
# turn, ROUNDS times, and prints one line per run with the engine's figures. This VM's speed
# drifts by tens of per cent over minutes, so alternating runs (not one run of each) are how
# BENCHMARKS.md compares a change with the code before it.
#
#   scripts/ab.sh [-r ROUNDS] BINARY_A BINARY_B [-- BENCH ARGS]
#
# Defaults: 2 rounds, `--customers 1000000 --events 3000000` (no broker). Keep a copy of the
# binary before the change, e.g. `cp target/release/microseg /tmp/before`.
# Needs python3 (to read the JSON lines).
set -euo pipefail

rounds=2
if [ "${1:-}" = "-r" ]; then
  rounds=$2
  shift 2
fi
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
a=$1
b=$2
shift 2
if [ "${1:-}" = "--" ]; then
  shift
fi
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--customers 1000000 --events 3000000)
fi

summary='
import json, sys
out = {}
for line in sys.stdin:
    d = json.loads(line)
    m = d["measurement"]
    if m == "decode_only":
        out["decode"] = d["decode_only_eps"]
    elif m == "engine":
        k = "default" if d["rules"] == "default" else "heavy"
        out[k] = d["engine_eps"]
        out[k + "+changelog"] = d["engine_with_changelog_eps"]
    elif m == "bytes_per_customer" and "bytes/customer" not in out:
        out["bytes/customer"] = d["bytes_per_customer"]
    elif m == "restore_in_memory":
        out["restore"] = d["restore_customers_per_s"]
    elif m == "e2e":
        out["e2e"] = d["e2e_eps"]
        out["baseline"] = d["baseline_eps"]
print("  ".join(f"{k} {v:,.0f}" for k, v in out.items()))
'

for r in $(seq "$rounds"); do
  for bin in "$a" "$b"; do
    printf '%s  round %s  ' "$bin" "$r"
    "$bin" bench "${args[@]}" 2>/dev/null | python3 -c "$summary"
  done
done
