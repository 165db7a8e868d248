#!/usr/bin/env bash
# Self-service keys at a million, in Redis: what a lookup costs a request.
#
# Loads 1,000,000 self-service keys (1,000 owners, 1,000 keys each) straight
# into a local redis-server in the layout src/state/keys_redis.rs writes,
# starts one keygate (one worker) on it, and measures at ONE connection, in
# interleaved rounds (wrk -t1 -c1):
#   toml-key      a TOML [[api_keys]] key (the baseline)
#   selfkey-hit   one self-service key again and again (the lookup cache)
#   selfkey-miss  a different self-service key on every request (each one a
#                 Redis lookup: the cache never holds it)
# and keygate's RSS before and after the misses (the cache is bounded:
# 100,000 entries). Bounded: ROUNDS x 3 x DURATION, plus ~1 min of loading.
#
#   benches/selfkeys_scale.sh
#   KEYS=200000 ROUNDS=5 benches/selfkeys_scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS=${KEYS:-1000000}
OWNERS=${OWNERS:-1000}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bin keygate
BIN=target/release/keygate

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port); KG=$(port); ADMIN=$(port); RDS=$(port)

# The upstream: a static nginx answer.
mkdir -p "$work/up"
cat > "$work/up/nginx.conf" <<NGINX
worker_processes 1;
error_log stderr error;
pid $work/up/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  server { listen 127.0.0.1:$UP; location / { return 200 '{"vms":[]}'; } }
}
NGINX
nginx -c "$work/up/nginx.conf" -p "$work/up" & pids+=($!)
redis-server --bind 127.0.0.1 --port "$RDS" --dir "$work" --save '' --appendonly no >"$work/redis.log" 2>&1 & pids+=($!)
for _ in $(seq 50); do redis-cli -p "$RDS" PING >/dev/null 2>&1 && break; sleep 0.1; done

# The keys, as RESP commands for redis-cli --pipe; the first 300,000 key
# strings to a file for the misses.
echo "loading $KEYS keys into Redis..."
started=$(date +%s)
python3 - "$KEYS" "$OWNERS" "$work/keys.txt" <<'PY' | redis-cli -p "$RDS" --pipe >/dev/null
import hashlib, json, os, sys, zlib
n, owners, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
A = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
def b62(v, w):
    s = []
    for _ in range(w):
        v, r = divmod(v, 62); s.append(A[r])
    return "".join(reversed(s))
def resp(*args):
    parts = [f"*{len(args)}\r\n"]
    for a in args:
        parts.append(f"${len(a.encode())}\r\n{a}\r\n")
    return "".join(parts)
w = sys.stdout.write
kept = open(out, "w")
for i in range(n):
    body = b62(int.from_bytes(os.urandom(32), "big"), 43)
    key = "kg_" + body + b62(zlib.crc32(("kg_" + body).encode()), 6)
    h = hashlib.sha256(key.encode()).hexdigest()
    user = f"u_{i % owners:04d}"
    kid = f"key_{i:022d}"
    rec = json.dumps({"id": kid, "user": user, "name": "bench", "start": key[:9], "sha256": h,
                      "permissions": ["vms:read"], "ip_allow": [], "created_at": 1780000000,
                      "expires_at": None, "revoked_at": None, "last_used_at": None},
                     separators=(",", ":"))
    w(resp("HSET", "kg-bench:keys:{" + user + "}", kid, rec))
    w(resp("SET", "kg-bench:kh:{" + h + "}", user + " " + kid))
    w(resp("SET", "kg-bench:kid:{" + kid + "}", user))
    if i < 300000:
        kept.write(key + "\n")
PY
echo "loaded in $(( $(date +%s) - started )) s; Redis: $(redis-cli -p "$RDS" INFO memory | awk -F: '/^used_memory_human/ {print $2}' | tr -d '\r')"

TOML_KEY="vmc_bench_$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export KEYGATE_JWT_SECRET="bench-secret-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
{
cat <<TOML
[server]
listen = "127.0.0.1:$KG"
admin_listen = "127.0.0.1:$ADMIN"
threads = 1
state_dir = "$work/state"
[log]
access = "off"
level = "warn"
[upstream]
url = "http://127.0.0.1:$UP"
[[auth.keys]]
kid = "b"
algorithm = "HS256"
secret_env = "KEYGATE_JWT_SECRET"
sign = true
[auth.self_service]
enabled = true
[tiers.pro]
unlimited = true
[[api_keys]]
id = "toml-key"
sha256 = "$(printf %s "$TOML_KEY" | sha256sum | cut -d' ' -f1)"
user = "u_0000"
[[routes]]
path = "/v1/vms"
methods = ["GET"]
permissions = ["vms:read"]
[state]
backend = "redis"
url = "redis://127.0.0.1:$RDS"
key_prefix = "kg-bench"
record_key = "selfkeys-bench-record-key-of-32-bytes-or-more"
TOML
for u in $(seq 0 $((OWNERS - 1))); do
  printf '[[users]]\nemail = "u%04d@example.com"\nid = "u_%04d"\ntier = "pro"\npermissions = ["vms:read"]\n' "$u" "$u"
done
} > "$work/keygate.toml"
"$BIN" run -c "$work/keygate.toml" 2>"$work/keygate.log" & pids+=($!); KG_PID=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$ADMIN/healthz" >/dev/null && break; sleep 0.1; done
HIT_KEY=$(sed -n 300000p "$work/keys.txt")
code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $HIT_KEY" "http://127.0.0.1:$KG/v1/vms")
[ "$code" = 200 ] || { echo "a loaded key answered $code"; tail "$work/keygate.log"; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Key: $TOML_KEY" "http://127.0.0.1:$KG/v1/vms")
[ "$code" = 200 ] || { echo "the TOML key answered $code"; exit 1; }

# wrk: each miss request takes the next key of the file (never one twice).
cat > "$work/miss.lua" <<LUA
local keys, i = {}, 0
for line in io.lines("$work/keys.txt") do keys[#keys + 1] = line end
local offset = tonumber(os.getenv("OFFSET") or "0")
request = function()
  i = i + 1
  return wrk.format("GET", "/v1/vms", { ["X-API-Key"] = keys[offset + i] })
end
LUA
rss() { awk '/^VmRSS/ {print $2 / 1024 " MiB"}' "/proc/$KG_PID/status"; }
echo "keygate RSS before: $(rss)"
declare -A p50 rps
offset=0
for r in $(seq "$ROUNDS"); do
  for t in toml-key selfkey-hit selfkey-miss; do
    case $t in
      toml-key) out=$(wrk -t1 -c1 -d"$DURATION" --latency -H "X-API-Key: $TOML_KEY" "http://127.0.0.1:$KG/v1/vms") ;;
      selfkey-hit) out=$(wrk -t1 -c1 -d"$DURATION" --latency -H "X-API-Key: $HIT_KEY" "http://127.0.0.1:$KG/v1/vms") ;;
      selfkey-miss) out=$(OFFSET=$offset wrk -t1 -c1 -d"$DURATION" --latency -s "$work/miss.lua" "http://127.0.0.1:$KG/v1/vms") ;;
    esac
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    [ -z "$non2xx" ] || { echo "$t: $non2xx non-2xx answers"; exit 1; }
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    [ "$t" = selfkey-miss ] && offset=$((offset + n))
    [ "$offset" -lt 290000 ] || { echo "ran out of distinct keys; shorten DURATION"; exit 1; }
    p50[$t]+="$(awk '$1=="50%" {print $2}' <<<"$out") "
    rps[$t]+="$(awk '/Requests\/sec/ {print $2}' <<<"$out") "
  done
done
echo "keygate RSS after $offset distinct keys looked up: $(rss)"
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^keygate_self_service_key_(cache|store_lookups)_total' || true
python3 - "$ROUNDS" "${p50[toml-key]}" "${p50[selfkey-hit]}" "${p50[selfkey-miss]}" \
    "${rps[toml-key]}" "${rps[selfkey-hit]}" "${rps[selfkey-miss]}" <<'PY'
import statistics, sys
def us(v):
    for unit, f in (("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)
names = ["toml-key", "selfkey-hit", "selfkey-miss"]
p50 = {n: statistics.median(us(x) for x in sys.argv[2 + i].split()) for i, n in enumerate(names)}
rps = {n: statistics.median(float(x) for x in sys.argv[5 + i].split()) for i, n in enumerate(names)}
print(f"median of {sys.argv[1]} interleaved rounds; wrk -t1 -c1; one keygate worker")
print("| request | req/s | p50 µs | added vs toml-key |")
print("| --- | ---: | ---: | ---: |")
for n in names:
    print(f"| {n} | {rps[n]:,.0f} | {p50[n]:.0f} | {p50[n] - p50['toml-key']:+.0f} µs |")
PY
