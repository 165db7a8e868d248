#!/usr/bin/env bash
# Loopback load comparison, every contender with ONE worker thread, in
# interleaved rounds so machine noise hits every target alike:
#   direct          wrk straight to a static nginx upstream (the ceiling)
#   nginx-proxy     nginx proxy_pass, no auth, upstream keepalive
#   haproxy-jwt     HAProxy 2.6: jwt_verify HS256 + exp check + stick-table rate per sub
#   keygate-jwt     keygate, HS256 JWT, limited tier (limiter active)
#   keygate-apikey  keygate, API key, same account
#   keygate-selfkey keygate, a self-service key (made through the admin API,
#                   kept in the embedded store, served from the lookup cache)
#   keygate-selfkey-redis the same on keygate-redis: the key in Redis
#   keygate-apikey-redis  the TOML key on keygate-redis (selfkey-redis's baseline)
#   nginx-proxy-log nginx-proxy with its access_log on (combined, to a file)
#   keygate-jwt-log keygate-jwt with access = "json" (stdout to a file)
#   keygate-redis   keygate-jwt with its limits in a local redis-server
#                   ([state] backend = "redis"): a Redis decision per request
#                   (batched per thread and account)
#   pingora-bare    pingora 0.9 proxying with no logic at all
#                   (examples/bare_pingora.rs): what keygate would cost if
#                   its proxy path still ran on pingora's ProxyHttp
#   hyper-bare      hyper 1.x + hyper-util's pooled client, no logic, one
#                   thread (examples/bare_hyper.rs): the other engine keygate
#                   could have been built on
# Then the TLS and HTTP/2 rows of benches/tls_load.sh (against nginx and
# HAProxy with TLS) unless ONLY is set.
# Bounded: ROUNDS x targets x DURATION seconds.
#
#   benches/load.sh                 # 3 rounds of 10 s, 32 connections
#   ROUNDS=5 DURATION=15s benches/load.sh
#   ONLY="nginx-proxy-log keygate-jwt keygate-jwt-log" benches/load.sh
#                                   # a subset of the rows (same run, same rules)
#   INSTRUCTIONS=1 benches/load.sh  # no timing: callgrind counts the user-space
#                                   # instructions per request of keygate-jwt
#                                   # and keygate-jwt-log (20,000 requests after
#                                   # a warm-up; repeatable on a busy machine)
#
# Installs nginx and wrk from Debian when missing. Only 127.0.0.1 is used.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
THREADS=${KEYGATE_THREADS:-1}

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v haproxy >/dev/null || need+=(haproxy)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bin keygate --example bare_pingora --example bare_hyper
BIN=target/release/keygate

work=$(mktemp -d)
pids=()
# SIGTERM, then SIGKILL for what is left a second later (pingora, in
# bare_pingora, answers SIGTERM with a graceful wait of minutes).
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port); KG=$(port); ADMIN=$(port); NGX=$(port); HAP=$(port); BARE=$(port); HYP=$(port)
KGR=$(port); ADMINR=$(port); RDS=$(port)
NGXL=$(port); KGL=$(port); ADMINL=$(port)

cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UP;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
NGINX
# The reference proxy: nginx proxy_pass, no auth, keepalive to the upstream.
mkdir -p "$work/proxy"
cat > "$work/proxy/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/proxy/nginx.pid;
error_log $work/proxy/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream api { server 127.0.0.1:$UP; keepalive 1024; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
}
NGINX
# The same, logging every request as nginx does by default.
mkdir -p "$work/proxylog"
sed -e "s|127.0.0.1:$NGX|127.0.0.1:$NGXL|" -e "s|$work/proxy/|$work/proxylog/|g" \
    -e "s|access_log off;|access_log $work/proxylog/access.log combined;|" \
    "$work/proxy/nginx.conf" > "$work/proxylog/nginx.conf"
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
nginx -c "$work/proxy/nginx.conf" -p "$work/proxy" & pids+=($!)
nginx -c "$work/proxylog/nginx.conf" -p "$work/proxylog" & pids+=($!)

API_KEY="vmc_load_$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
KEY_SHA=$(printf %s "$API_KEY" | sha256sum | cut -d' ' -f1)
export KEYGATE_JWT_SECRET="load-test-secret-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
cat > "$work/keygate.toml" <<TOML
[server]
listen = "127.0.0.1:$KG"
admin_listen = "127.0.0.1:$ADMIN"
threads = $THREADS
state_dir = "$work/state"
[log]
access = "off"
level = "warn"
[upstream]
url = "http://127.0.0.1:$UP"
[[auth.keys]]
kid = "load"
algorithm = "HS256"
secret_env = "KEYGATE_JWT_SECRET"
sign = true
[auth.self_service]
enabled = true
[tiers.pro]
limit = 1000000000
period = "1h"
[[users]]
email = "load@example.com"
id = "u_load"
tier = "pro"
permissions = ["vms:read"]
[[api_keys]]
id = "load-key"
sha256 = "$KEY_SHA"
user = "u_load"
[[routes]]
path = "/v1/vms"
methods = ["GET"]
permissions = ["vms:read"]
TOML
# The same keygate with its JSON access log on.
sed -e "s/127.0.0.1:$KG/127.0.0.1:$KGL/" -e "s/127.0.0.1:$ADMIN\"/127.0.0.1:$ADMINL\"/" \
    -e 's/^access = "off"/access = "json"/' -e "s|$work/state\"|$work/state-log\"|" \
    "$work/keygate.toml" > "$work/keygate-log.toml"
# The same keygate, its limits in Redis.
sed -e "s/127.0.0.1:$KG/127.0.0.1:$KGR/" -e "s/127.0.0.1:$ADMIN\"/127.0.0.1:$ADMINR\"/" \
    -e "s|$work/state\"|$work/state-redis\"|" \
    "$work/keygate.toml" > "$work/keygate-redis.toml"
cat >> "$work/keygate-redis.toml" <<TOML
[state]
backend = "redis"
url = "redis://127.0.0.1:$RDS"
record_key = "load-bench-record-key-of-32-bytes-or-more"
TOML
cat > "$work/haproxy.cfg" <<HAPROXY
global
  nbthread 1
  log stdout format raw local0 emerg
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
backend per_sub
  stick-table type string len 64 size 100k expire 1h store http_req_rate(1h)
backend api
  http-reuse always
  server s1 127.0.0.1:$UP
frontend fe
  bind 127.0.0.1:$HAP
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('\$.alg')
  http-request deny status 401 unless { var(txn.alg) -m str HS256 }
  http-request deny status 401 unless { var(txn.bearer),jwt_verify(txn.alg,"$KEYGATE_JWT_SECRET") -m int 1 }
  http-request set-var(txn.now) date()
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
  http-request deny status 401 if { var(txn.exp),sub(txn.now) -m int le 0 }
  http-request set-var(txn.sub) var(txn.bearer),jwt_payload_query('\$.sub')
  http-request track-sc0 var(txn.sub) table per_sub
  http-request deny status 429 if { sc_http_req_rate(0,per_sub) gt 1000000000 }
  default_backend api
HAPROXY
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!)
# Under INSTRUCTIONS, these two run under callgrind (about 50 times slower).
counted=()
[ -n "${INSTRUCTIONS:-}" ] && counted=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.%p")
"${counted[@]}" "$BIN" run -c "$work/keygate.toml" 2>"$work/keygate.log" & pids+=($!); KG_PID=$!
"${counted[@]}" "$BIN" run -c "$work/keygate-log.toml" >"$work/keygate-access.log" 2>"$work/keygate-log.log" & pids+=($!); KGL_PID=$!
redis-server --bind 127.0.0.1 --port "$RDS" --dir "$work" --save '' --appendonly no >"$work/redis.log" 2>&1 & pids+=($!)
sleep 0.3
"$BIN" run -c "$work/keygate-redis.toml" 2>"$work/keygate-redis.log" & pids+=($!)
target/release/examples/bare_pingora "127.0.0.1:$BARE" "127.0.0.1:$UP" 2>"$work/bare.log" & pids+=($!)
target/release/examples/bare_hyper "127.0.0.1:$HYP" "127.0.0.1:$UP" 2>"$work/hyper.log" & pids+=($!)
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$ADMIN/healthz" >/dev/null && break; sleep 0.1; done
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMINR/healthz" >/dev/null && break; sleep 0.1; done
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$ADMINL/healthz" >/dev/null && break; sleep 0.1; done

JWT=$(python3 - "$KEYGATE_JWT_SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=")
h = b(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "load"}).encode())
now = int(time.time())
c = b(json.dumps({"sub": "u_load", "iss": "keygate", "aud": "api", "iat": now, "exp": now + 7200}).encode())
s = b(hmac.new(sys.argv[1].encode(), h + b"." + c, hashlib.sha256).digest())
print((h + b"." + c + b"." + s).decode())
PY
)
smoke() { # expected-status url header...
    local want=$1 url=$2; shift 2
    local got; got=$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url" || true)
    [ "$got" = "$want" ] || { echo "smoke check: $url answered $got, not $want"; tail -n 20 "$work"/*.log; exit 1; }
}
smoke 200 "http://127.0.0.1:$KG/v1/vms" -H "X-API-Key: $API_KEY"
# A self-service key on each store, made as a customer's would be.
self_key() { # admin-port
    curl -sf -X POST "http://127.0.0.1:$1/keys" \
        -d '{"user": "u_load", "name": "load", "permissions": ["vms:read"]}' |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])'
}
SELF_KEY=$(self_key "$ADMIN")
SELF_KEY_R=$(self_key "$ADMINR")
smoke 200 "http://127.0.0.1:$KG/v1/vms" -H "X-API-Key: $SELF_KEY"
smoke 200 "http://127.0.0.1:$KGR/v1/vms" -H "X-API-Key: $SELF_KEY_R"
smoke 200 "http://127.0.0.1:$KG/v1/vms" -H "Authorization: Bearer $JWT"
smoke 200 "http://127.0.0.1:$HAP/v1/vms" -H "Authorization: Bearer $JWT"
# A wrong signature: change a character well inside it (the last one may
# carry only padding bits that a decoder is free to ignore).
i=$(( ${#JWT} - 10 )); c=${JWT:$i:1}; [ "$c" = A ] && r=B || r=A
BAD_JWT="${JWT:0:$i}$r${JWT:$((i + 1))}"
smoke 401 "http://127.0.0.1:$HAP/v1/vms" -H "Authorization: Bearer $BAD_JWT"
smoke 401 "http://127.0.0.1:$KG/v1/vms" -H "Authorization: Bearer $BAD_JWT"
smoke 401 "http://127.0.0.1:$HAP/v1/vms"
smoke 200 "http://127.0.0.1:$HYP/v1/vms"
smoke 200 "http://127.0.0.1:$KGR/v1/vms" -H "Authorization: Bearer $JWT"
smoke 200 "http://127.0.0.1:$KGL/v1/vms" -H "Authorization: Bearer $JWT"
smoke 200 "http://127.0.0.1:$NGXL/v1/vms"

if [ -n "${INSTRUCTIONS:-}" ]; then
  command -v h2load >/dev/null || { apt-get install -y -qq nghttp2-client >/dev/null; }
  declare -A per
  for t in "keygate-jwt|$KG_PID|$KG" "keygate-jwt-log|$KGL_PID|$KGL"; do
    IFS='|' read -r name pid p <<<"$t"
    url="http://127.0.0.1:$p/v1/vms"
    h2load --h1 -n 2000 -c 4 -H "Authorization: Bearer $JWT" "$url" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    out=$(h2load --h1 -n 20000 -c 4 -H "Authorization: Bearer $JWT" "$url")
    grep -q "20000 succeeded" <<<"$out" || { echo "$name: $out"; exit 1; }
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    file=$(ls -t "$work"/callgrind."$pid"* | head -1)
    total=$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    per[$name]=$((total / 20000))
    echo "$name: ${per[$name]} instructions per request (callgrind, user space)"
  done
  off=${per[keygate-jwt]}; on=${per[keygate-jwt-log]}
  echo "access log on: +$((on - off)) instructions per request ($(python3 -c "print(f'{$on / $off:.3f}x')"))"
  exit 0
fi

# name|url|header
targets=(
  "direct|http://127.0.0.1:$UP/v1/vms|"
  "nginx-proxy|http://127.0.0.1:$NGX/v1/vms|"
  "nginx-proxy-log|http://127.0.0.1:$NGXL/v1/vms|"
  "haproxy-jwt|http://127.0.0.1:$HAP/v1/vms|Authorization: Bearer $JWT"
  "keygate-jwt|http://127.0.0.1:$KG/v1/vms|Authorization: Bearer $JWT"
  "keygate-apikey|http://127.0.0.1:$KG/v1/vms|X-API-Key: $API_KEY"
  "keygate-selfkey|http://127.0.0.1:$KG/v1/vms|X-API-Key: $SELF_KEY"
  "keygate-selfkey-redis|http://127.0.0.1:$KGR/v1/vms|X-API-Key: $SELF_KEY_R"
  "keygate-apikey-redis|http://127.0.0.1:$KGR/v1/vms|X-API-Key: $API_KEY"
  "keygate-jwt-log|http://127.0.0.1:$KGL/v1/vms|Authorization: Bearer $JWT"
  "keygate-redis|http://127.0.0.1:$KGR/v1/vms|Authorization: Bearer $JWT"
  "pingora-bare|http://127.0.0.1:$BARE/v1/vms|"
  "hyper-bare|http://127.0.0.1:$HYP/v1/vms|"
)
if [ -n "${ONLY:-}" ]; then
  kept=()
  for t in "${targets[@]}"; do
    case " $ONLY " in *" ${t%%|*} "*) kept+=("$t") ;; esac
  done
  targets=("${kept[@]}")
fi
declare -A rps p50 p99
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    IFS='|' read -r name url header <<<"$t"
    args=(-t1 -c"$CONNS" -d"$DURATION" --latency)
    [ -n "$header" ] && args+=(-H "$header")
    out=$(wrk "${args[@]}" "$url")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    [ -z "$non2xx" ] || { echo "$name: $non2xx non-2xx answers"; exit 1; }
    rps[$name]+="$(awk '/Requests\/sec/ {print $2}' <<<"$out") "
    p50[$name]+="$(awk '$1=="50%" {print $2}' <<<"$out") "
    p99[$name]+="$(awk '$1=="99%" {print $2}' <<<"$out") "
  done
done

args=()
for m in rps p50 p99; do
  for n in direct nginx-proxy nginx-proxy-log haproxy-jwt keygate-jwt keygate-apikey keygate-selfkey keygate-selfkey-redis keygate-apikey-redis keygate-jwt-log keygate-redis pingora-bare hyper-bare; do
    eval "args+=(\"\${$m[$n]:-}\")"
  done
done
python3 - "$ROUNDS" "${args[@]}" <<'PY'
import statistics, sys
names = ["direct", "nginx-proxy", "nginx-proxy-log", "haproxy-jwt", "keygate-jwt", "keygate-apikey", "keygate-selfkey", "keygate-selfkey-redis", "keygate-apikey-redis", "keygate-jwt-log", "keygate-redis", "pingora-bare", "hyper-bare"]
def ms(v):
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)
a = sys.argv[2:]
k = len(names)
ran = [n for i, n in enumerate(names) if a[i].split()]
rps = {n: statistics.median(float(x) for x in a[i].split()) for i, n in enumerate(names) if n in ran}
p50 = {n: statistics.median(ms(x) for x in a[k + i].split()) for i, n in enumerate(names) if n in ran}
p99 = {n: statistics.median(ms(x) for x in a[2 * k + i].split()) for i, n in enumerate(names) if n in ran}
ratio = lambda n, base: f"{rps[n] / rps[base]:.2f}x" if base in rps else "-"
print(f"median of {sys.argv[1]} interleaved rounds; wrk -t1 -c32; one worker thread each")
print("| target | req/s | p50 ms | p99 ms | vs nginx-proxy | vs haproxy-jwt |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for n in ran:
    print(f"| {n} | {rps[n]:,.0f} | {p50[n]:.3f} | {p99[n]:.3f} | {ratio(n, 'nginx-proxy')} | {ratio(n, 'haproxy-jwt')} |")
if "keygate-selfkey" in rps:
    print()
    for n, base in (("keygate-selfkey", "keygate-apikey"), ("keygate-selfkey-redis", "keygate-apikey-redis")):
        if n in rps:
            print(f"self-service key: {n} = {ratio(n, base)} {base} (a TOML key, same keygate)")
if "keygate-jwt-log" in rps:
    print()
    print(f"access log on: keygate-jwt-log = {ratio('keygate-jwt-log', 'keygate-jwt')} keygate-jwt (log off), "
          f"{ratio('keygate-jwt-log', 'nginx-proxy-log')} nginx-proxy-log")
PY

# The Redis sections only when its row ran.
if [ -n "${ONLY:-}" ]; then case " $ONLY " in *" keygate-redis "*) ;; *) exit 0 ;; esac; fi

# What Redis adds to one request: one connection, interleaved rounds.
declare -A one
for r in $(seq "$ROUNDS"); do
  for t in "keygate-jwt|$KG" "keygate-redis|$KGR"; do
    IFS='|' read -r name port <<<"$t"
    out=$(wrk -t1 -c1 -d"$DURATION" --latency -H "Authorization: Bearer $JWT" "http://127.0.0.1:$port/v1/vms")
    one[$name]+="$(awk '$1=="50%" {print $2}' <<<"$out") "
  done
done
python3 - "${one[keygate-jwt]}" "${one[keygate-redis]}" <<'PY'
import statistics, sys
def us(v):
    for unit, f in (("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)
emb, red = (statistics.median(us(x) for x in a.split()) for a in sys.argv[1:3])
print()
print("one connection (wrk -t1 -c1), median p50:")
print(f"| keygate-jwt (embedded) | {emb:.0f} µs |")
print(f"| keygate-redis | {red:.0f} µs |")
print(f"| added by Redis | {red - emb:.0f} µs |")
PY

# Redis calls per decision in the keygate-redis runs (batching: concurrent
# decisions for one account on one thread share a call).
curl -s "http://127.0.0.1:$ADMINR/metrics" | python3 -c '
import re, sys
m = sys.stdin.read()
def val(pat):
    return sum(float(x) for x in re.findall(pat + r" ([0-9.e+]+)", m))
calls = val(r"keygate_redis_calls_total\{op=\"gcra\",outcome=\"ok\"\}")
decisions = val(r"keygate_limit_decisions_total\{source=\"redis\"\}")
print()
print(f"keygate-redis: {decisions:,.0f} decisions from Redis in {calls:,.0f} calls "
      f"= {calls / max(decisions, 1):.3f} calls per decision")
'

# TLS and HTTP/2 rows (benches/tls_load.sh), after everything above is stopped.
if [ -z "${ONLY:-}" ]; then
  cleanup
  trap - EXIT
  echo
  ROUNDS=$ROUNDS DURATION=${DURATION%s} CONNS=$CONNS benches/tls_load.sh
fi
