#!/usr/bin/env bash
# Sizing figures for a fleet's Redis: GCRA decisions a second per Redis core
# (the script keygate runs, one unit per call, random accounts, and 8 units
# per call as a hot account's batches are), and bytes per account key and per
# refresh-token family. Starts its own redis-server on a free loopback port;
# bounded (~30 s).
#
#   benches/redis_sizing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null ||
    { echo "needs redis-server and redis-benchmark (apt-get install redis-server)"; exit 1; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
redis-server --bind 127.0.0.1 --port "$PORT" --dir "$dir" --save '' --appendonly no >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
cli() { redis-cli -p "$PORT" "$@"; }
for _ in $(seq 50); do cli PING >/dev/null 2>&1 && break; sleep 0.1; done

# The script, exactly as src/state/fleet.rs holds it.
SCRIPT=$(python3 - <<'PY'
import re
src = open("src/state/fleet.rs").read()
print(re.search(r'pub const GCRA: &str = r#"(.*?)"#;', src, re.S).group(1))
PY
)
SHA=$(cli SCRIPT LOAD "$SCRIPT")
# 100/h free tier: interval 36 s, burst 100 → tolerance 3,600 s (µs).
# Each call carries the key count (1) and key; redis-benchmark replaces
# __rand_int__ with a random number per call.
bench() { # units-per-call
    redis-benchmark -p "$PORT" -c 32 -n 300000 -r 1000000 -q \
        EVALSHA "$SHA" 1 "kg:limit:{__rand_int__}" 36000000 3600000000000 "$1" |
        awk '/requests per second/ {for (i=1;i<=NF;i++) if ($(i+1) ~ /requests/) print $i}'
}
one=$(bench 1)
eight=$(bench 8)
echo "GCRA calls/s on one Redis core, 32 clients, random accounts:"
echo "  1 unit per call:  $one calls/s = $one decisions/s"
python3 -c "print(f'  8 units per call: $eight calls/s = {float(\"$eight\")*8:,.0f} decisions/s (a hot account, batched)')"

cli FLUSHALL >/dev/null
cli EVALSHA "$SHA" 1 "keygate:limit:{0123456789abcdef0123456789abcdef}" 36000000 3600000000000 1 >/dev/null
acct=$(cli MEMORY USAGE "keygate:limit:{0123456789abcdef0123456789abcdef}")
echo "one account's limiter key: $acct bytes (MEMORY USAGE)"

# A refresh family as src/state/families.rs writes it: one small hash (the
# user and the live token) and one index key per token, kept until that
# token could no longer be presented (reuse detection).
fam="keygate:fam:{0123456789abcdef0123456789abcdef}"
cli DEL "$fam" >/dev/null
cli HSET "$fam" u u_alice c "$(printf '%064x' 999)" ci 1780000000 ce 1782592000 >/dev/null
cli EXPIRE "$fam" 2592000 >/dev/null
f=$(cli MEMORY USAGE "$fam")
h=$(printf '%064x' 1)
cli SET "keygate:rt:{$h}" 0123456789abcdef0123456789abcdef EX 2592000 >/dev/null
idx=$(cli MEMORY USAGE "keygate:rt:{$h}")
echo "refresh family hash: $f bytes; index key per token: $idx bytes"
echo "refresh family, 1 token: $((f + idx)) bytes"
echo "refresh family after 30 rotations (a month of daily refreshes): $((f + 30 * idx)) bytes"
