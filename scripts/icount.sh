#!/usr/bin/env bash
# Counts the instructions the engine executes per event, under valgrind's callgrind: a figure
# that does not drift with the machine's load (repeated runs agree within 0.01 %), so a
# change of 1 % shows, where wall-clock runs on this VM drift by tens of per cent
# (scripts/ab.sh). It counts work, not cache misses: confirm a gain in time with
# scripts/ab.sh, and read the figures in BENCHMARKS.md.
#
#   scripts/icount.sh BINARY [default|heavy] [CUSTOMERS EVENTS]
#
# Defaults: the default rules, 20 000 customers and 200 000 events (ten each, as in the full
# benchmark; about 45 s). Prints instructions per event of `Processor::event` (timers, state
# update, rules, diff, changelog body) and of `change_json` (the changes' serialization), each
# counted in its own run, inclusive of everything they call. Needs valgrind.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
bin=$1
rules=${2:-default}
customers=${3:-20000}
events=${4:-200000}
out=$(mktemp)
trap 'rm -f "$out" "$out.err"' EXIT

for fn in microseg::processor::Processor::event microseg::output::change_json; do
  valgrind --tool=callgrind --callgrind-out-file="$out" --collect-atstart=no \
    --toggle-collect="$fn" \
    "$bin" bench --customers "$customers" --events "$events" --only "$rules" \
    >/dev/null 2>"$out.err" || {
    echo "icount: the run failed (a build without \`bench --only\`?):" >&2
    tail -5 "$out.err" >&2
    exit 1
  }
  total=$(sed -n 's/^totals: *//p' "$out")
  printf '%-40s %8d instructions/event\n' "$fn" $((total / events))
done
