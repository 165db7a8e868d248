#!/usr/bin/env bash
# TOML keys at a million: how long `keygate check` and a live reload take
# for a policy with KEYS [[api_keys]] entries (one owner, like a customer
# base exported to the file), and the peak RSS of each. Bounded: about a
# minute.
#
#   benches/million_keys.sh
#   KEYS=100000 benches/million_keys.sh
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-1000000}
RUNS=${RUNS:-3}
cargo build --release --quiet --bin keygate
BIN=$PWD/target/release/keygate
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
KG=$(port); ADMIN=$(port)
export KEYGATE_JWT_SECRET="bench-secret-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
python3 - "$KEYS" "$work" "$KG" "$ADMIN" <<'PY'
import hashlib, sys
n, work, kg, admin = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
with open(f"{work}/keygate.toml", "w") as f:
    f.write(f'''[server]
listen = "127.0.0.1:{kg}"
admin_listen = "127.0.0.1:{admin}"
threads = 1
state_dir = "{work}/state"
[log]
access = "off"
level = "warn"
[upstream]
url = "http://127.0.0.1:9"
[[auth.keys]]
kid = "k"
algorithm = "HS256"
secret_env = "KEYGATE_JWT_SECRET"
sign = true
[tiers.free]
limit = 100
period = "1h"
[[users]]
email = "a@example.com"
id = "u_a"
tier = "free"
permissions = ["vms:read", "vms:write"]
''')
    for i in range(n):
        h = hashlib.sha256(b"key-%d" % i).hexdigest()
        f.write(f'[[api_keys]]\nid = "k{i}"\nsha256 = "{h}"\nuser = "u_a"\npermissions = ["vms:read"]\n')
PY
echo "policy: $KEYS keys, $(du -h "$work/keygate.toml" | cut -f1)"
for r in $(seq "$RUNS"); do
  /usr/bin/time -f "check: %e s, peak RSS %M KiB" "$BIN" check -c "$work/keygate.toml" 2>&1 >/dev/null |
      grep -E '^check:'
done
"$BIN" run -c "$work/keygate.toml" 2>"$work/keygate.log" & pid=$!
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$ADMIN/healthz" >/dev/null && break; sleep 0.1; done
hwm() { awk '/^VmHWM/ {printf "%.0f MiB", $2 / 1024}' "/proc/$pid/status"; }
rss() { awk '/^VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/$pid/status"; }
echo "serving: RSS $(rss), peak $(hwm) (start-up included)"
for r in $(seq "$RUNS"); do
  t=$(curl -s -o "$work/reload.json" -w '%{time_total}' -X POST "http://127.0.0.1:$ADMIN/reload")
  grep -q '"success"' "$work/reload.json" || { cat "$work/reload.json"; exit 1; }
  sleep 1
  echo "reload (POST /reload, whole round trip): ${t} s; RSS after $(rss), peak so far $(hwm)"
done
