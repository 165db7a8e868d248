#!/usr/bin/env bash
# TLS and HTTP/2 at the edge: keygate against nginx and HAProxy 2.6, each
# with ONE worker thread, the same ECDSA P-256 certificate, TLS 1.2+1.3,
# ALPN h2 + http/1.1, proxying to the same static nginx upstream; nginx
# proxies without auth, HAProxy and keygate verify an HS256 JWT (as in
# benches/load.sh). Interleaved rounds, medians, ratios from the same run.
#
#   tls-keepalive   wrk over https, 32 keep-alive connections: req/s
#   tls-new         wrk with "Connection: close": a new TLS connection per
#                   request (handshakes/s), resumption off on the server
#   tls-resumed     the same with resumption on (tickets + session cache;
#                   wrk's OpenSSL resumes what the server allows)
#   h2              h2load, 32 clients x 10 concurrent streams: req/s
#
#   benches/tls_load.sh                      # 3 rounds of 10 s
#   ROUNDS=5 DURATION=15 benches/tls_load.sh
#   KINDS="h2" benches/tls_load.sh           # some rows only
#
# Installs nginx, wrk, haproxy and nghttp2-client from Debian when missing.
# Only 127.0.0.1 is used. Bounded: ROUNDS x 12 runs x DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}

need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v haproxy >/dev/null || need+=(haproxy)
command -v h2load >/dev/null || need+=(nghttp2-client)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bin keygate
# KEYGATE_BIN: another keygate binary (an A/B against an older build).
BIN=${KEYGATE_BIN:-target/release/keygate}

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
UP=$(port)
NGX=$(port); NGXO=$(port); HAP=$(port); HAPO=$(port)
KG=$(port); KGO=$(port); ADMIN=$(port); ADMINO=$(port)

# One certificate for everyone: ECDSA P-256, signed by a throwaway CA.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench-ca -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj /CN=localhost -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$work/san.ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial \
    -days 2 -extfile "$work/san.ext" -out "$work/tls.crt" 2>/dev/null
cat "$work/tls.crt" "$work/tls.key" > "$work/haproxy.pem"

cat > "$work/upstream.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/upstream.pid;
error_log $work/upstream-error.log;
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
# nginx: TLS + h2, proxy_pass with upstream keepalive; a second server
# block with resumption off.
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  ssl_certificate $work/tls.crt;
  ssl_certificate_key $work/tls.key;
  ssl_protocols TLSv1.2 TLSv1.3;
  upstream api { server 127.0.0.1:$UP; keepalive 1024; }
  server {
    listen 127.0.0.1:$NGX ssl http2;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets on;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto https;
    }
  }
  server {
    listen 127.0.0.1:$NGXO ssl;
    ssl_session_cache off;
    ssl_session_tickets off;
    location / {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGINX

export KEYGATE_JWT_SECRET="load-test-secret-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
haproxy_cfg() { # port bind-options global-options
cat <<HAPROXY
global
  nbthread 1
  log stdout format raw local0 emerg
  $3
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
  bind 127.0.0.1:$1 ssl crt $work/haproxy.pem alpn h2,http/1.1 $2
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('\$.alg')
  http-request deny status 401 unless { var(txn.alg) -m str HS256 }
  http-request deny status 401 unless { var(txn.bearer),jwt_verify(txn.alg,"$KEYGATE_JWT_SECRET") -m int 1 }
  http-request set-var(txn.now) date()
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
  http-request deny status 401 if { var(txn.exp),sub(txn.now) -m int le 0 }
  http-request set-var(txn.sub) var(txn.bearer),jwt_payload_query('\$.sub')
  http-request track-sc0 var(txn.sub) table per_sub
  http-request deny status 429 if { sc_http_req_rate(0) gt 1000000000 }
  http-request set-header X-Forwarded-Proto https
  default_backend api
HAPROXY
}
haproxy_cfg "$HAP" "" "" > "$work/haproxy.cfg"
haproxy_cfg "$HAPO" "no-tls-tickets" "tune.ssl.cachesize 0" > "$work/haproxy-off.cfg"

keygate_cfg() { # port admin resumption state
cat <<TOML
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
threads = 1
state_dir = "$work/$4"
[server.tls]
cert_file = "$work/tls.crt"
key_file = "$work/tls.key"
session_resumption = $3
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
[tiers.pro]
limit = 1000000000
period = "1h"
[[users]]
email = "load@example.com"
id = "u_load"
tier = "pro"
permissions = ["vms:read"]
[[routes]]
path = "/v1/vms"
methods = ["GET"]
permissions = ["vms:read"]
TOML
}
keygate_cfg "$KG" "$ADMIN" true state > "$work/keygate.toml"
keygate_cfg "$KGO" "$ADMINO" false state-off > "$work/keygate-off.toml"

nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
nginx -c "$work/nginx.conf" -p "$work" & pids+=($!)
haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 & pids+=($!)
haproxy -f "$work/haproxy-off.cfg" -db >"$work/haproxy-off.log" 2>&1 & pids+=($!)
"$BIN" run -c "$work/keygate.toml" 2>"$work/keygate.log" & pids+=($!)
"$BIN" run -c "$work/keygate-off.toml" 2>"$work/keygate-off.log" & pids+=($!)
for a in "$ADMIN" "$ADMINO"; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$a/healthz" >/dev/null && break; sleep 0.1; done
done

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
AUTH="Authorization: Bearer $JWT"
smoke() { # url http-version-flag
    local got; got=$(curl -s -o /dev/null -w '%{http_code} %{http_version}' --cacert "$work/ca.crt" "$2" -H "$AUTH" "$1" || true)
    case "$got" in 200*) ;; *) echo "smoke check: $1 answered '$got'"; tail -n 20 "$work"/*.log; exit 1 ;; esac
}
for p in "$NGX" "$HAP" "$KG"; do
  smoke "https://localhost:$p/v1/vms" --http2
  smoke "https://localhost:$p/v1/vms" --http1.1
done
for p in "$NGXO" "$HAPO" "$KGO"; do smoke "https://localhost:$p/v1/vms" --http1.1; done

# name|kind|port
targets=(
  "nginx|keepalive|$NGX" "haproxy|keepalive|$HAP" "keygate|keepalive|$KG"
  "nginx|new|$NGXO" "haproxy|new|$HAPO" "keygate|new|$KGO"
  "nginx|resumed|$NGX" "haproxy|resumed|$HAP" "keygate|resumed|$KG"
  "nginx|h2|$NGX" "haproxy|h2|$HAP" "keygate|h2|$KG"
)
KINDS=${KINDS:-keepalive new resumed h2}
declare -A res
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    IFS='|' read -r name kind p <<<"$t"
    case " $KINDS " in *" $kind "*) ;; *) continue ;; esac
    url="https://127.0.0.1:$p/v1/vms"
    case $kind in
      keepalive) out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "$AUTH" "$url")
                 v=$(awk '/Requests\/sec/ {print $2}' <<<"$out") ;;
      new|resumed) out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "$AUTH" -H "Connection: close" "$url")
                 v=$(awk '/Requests\/sec/ {print $2}' <<<"$out") ;;
      h2)        out=$(h2load -t1 -c"$CONNS" -m10 -D "$DURATION" -H "$AUTH" "$url" 2>&1)
                 v=$(awk '/^finished in/ {print $4}' <<<"$out")
                 grep -q ' 0 failed, 0 errored' <<<"$out" || { echo "$name h2: failures"; echo "$out"; exit 1; } ;;
    esac
    bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    [ -z "$bad" ] || { echo "$name $kind: $bad non-2xx answers"; exit 1; }
    res[$name-$kind]+="$v "
  done
done

resumed=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^keygate_tls_handshakes_total\{result="resumed"/ {s+=$2} END {print s+0}')
full=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^keygate_tls_handshakes_total\{result="ok"/ {s+=$2} END {print s+0}')

args=()
for kind in keepalive new resumed h2; do
  for n in nginx haproxy keygate; do args+=("${res[$n-$kind]:-}"); done
done
python3 - "$ROUNDS" "$CONNS" "$resumed" "$full" "${args[@]}" <<'PY'
import statistics, sys
rounds, conns, resumed, full = sys.argv[1:5]
a = sys.argv[5:]
kinds = [("keepalive", "TLS keep-alive, wrk, req/s"),
         ("new", "new TLS connection per request, resumption off, conn/s"),
         ("resumed", "new TLS connection per request, resumption on, conn/s"),
         ("h2", f"HTTP/2, h2load {conns} clients x 10 streams, req/s")]
print(f"median of {rounds} interleaved rounds; one worker thread each; ECDSA P-256")
print("| row | nginx | haproxy | keygate | keygate / nginx | keygate / haproxy |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
i = 0
for kind, label in kinds:
    runs = [a[i + j].split() for j in range(3)]
    i += 3
    if not all(runs):
        continue
    v = [statistics.median(float(x) for x in r) for r in runs]
    print(f"| {label} | {v[0]:,.0f} | {v[1]:,.0f} | {v[2]:,.0f} | {v[2] / v[0]:.2f}x | {v[2] / v[1]:.2f}x |")
print()
print(f"keygate (resumption on) handshakes over the run: {float(resumed):,.0f} resumed, {float(full):,.0f} full")
PY
