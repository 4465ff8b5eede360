#!/usr/bin/env bash
# The whole test suite: unit, property, CLI and real-broker integration tests.
# Installs what it needs when missing: Debian build packages for librdkafka, promtool (Debian
# package prometheus, to check the metrics exposition), and the Nisshi
# Kafka-protocol broker (built from crates.io: ~15 minutes on 2 cores, once per machine).
# Extra arguments go to `cargo test` (e.g. scripts/test.sh broker).
set -euo pipefail
cd "$(dirname "$0")/.."

NISSHI_VERSION=0.8.1
export PATH="$HOME/.cargo/bin:$PATH"

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in build-essential pkg-config zlib1g-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v nisshi >/dev/null 2>&1 || ! nisshi --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
  echo "==> installing the Nisshi broker $NISSHI_VERSION (once per machine; slow on 2 cores)"
  # Its locked dependencies declare Rust 1.96 but build with 1.95, hence the flag.
  cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version
fi

echo "==> cargo test"
cargo test --all-targets "$@"
