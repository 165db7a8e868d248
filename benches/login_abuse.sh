#!/usr/bin/env bash
# What a login flood costs keygate (release build, loopback, bounded): for
# each scenario, N logins sent at once (one connection each, through the
# trusted proxy 127.0.0.2 so each can claim an address of its own), then
# the password checks keygate ran (keygate_login_verifications_total), the
# answers by status, the peak RSS of the process (VmHWM) and how long a
# real user's login took while it lasted.
#
#   one-email   N wrong guesses at one user's password, each from its own
#               address (login_attempts_per_email = 10)
#   one-address N guesses at N emails, all from one address
#   spread      N guesses at N emails from N addresses: no throttle applies,
#               only the bound on verifications (one per core, a queue of
#               four per core) does
#   sustained   DURATION seconds of `spread` waves back to back
#
#   benches/login_abuse.sh              # N=200, DURATION=20 (seconds)
#   N=500 DURATION=30 benches/login_abuse.sh
#
# Argon2 parameters are `keygate hash-password`'s (m=19456 KiB, t=2, p=1).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
SUSTAINED=${DURATION:-20}

cargo build --release --quiet --bin keygate
BIN=$PWD/target/release/keygate
work=$(mktemp -d)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
KG=$(port); ADMIN=$(port); UP=$(port)
HASH=$(printf 'the right password' | "$BIN" hash-password)
cat > "$work/keygate.toml" <<TOML
[server]
listen = "127.0.0.1:$KG"
admin_listen = "127.0.0.1:$ADMIN"
threads = 1
trusted_proxies = ["127.0.0.2/32"]
state_dir = "$work/state"
[log]
access = "off"
[upstream]
url = "http://127.0.0.1:$UP"
[auth]
login_attempts_per_email = 10
login_attempts_per_ip = 30
[[auth.keys]]
kid = "k"
algorithm = "HS256"
secret_env = "BENCH_HS"
sign = true
[tiers.free]
limit = 100
period = "1h"
[[users]]
email = "victim@example.com"
tier = "free"
password_hash = "$HASH"
[[users]]
email = "bystander@example.com"
tier = "free"
password_hash = "$HASH"
TOML
BENCH_HS=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n') \
    "$BIN" run -c "$work/keygate.toml" >/dev/null 2>"$work/keygate.log" &
pid=$!
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$ADMIN/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done

python3 - "$KG" "$ADMIN" "$pid" "$N" "$SUSTAINED" <<'PY'
import http.client, json, socket, sys, threading, time

kg, admin, pid, n, sustained = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def metric(name):
    c = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    c.request("GET", "/metrics")
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0

def rss():
    with open(f"/proc/{pid}/status") as f:
        fields = dict(l.split(":", 1) for l in f)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024

class Bound(http.client.HTTPConnection):
    """From 127.0.0.2, the trusted proxy: X-Forwarded-For is believed."""
    def connect(self):
        self.sock = socket.create_connection((self.host, self.port), self.timeout, ("127.0.0.2", 0))

def login(email, password, xff):
    c = Bound("127.0.0.1", kg, timeout=60)
    body = json.dumps({"email": email, "password": password})
    c.request("POST", "/api/v1/auth/token", body,
              {"Content-Type": "application/json", "X-Forwarded-For": xff})
    r = c.getresponse()
    r.read()
    c.close()
    return r.status

def wave(who):
    results, threads = [], []
    barrier = threading.Barrier(n)
    def one(i):
        email, xff = who(i)
        barrier.wait()
        results.append(login(email, "a wrong guess", xff))
    for i in range(n):
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
    return results, threads

def user_login_latency(stop, out):
    """A real user logging in over and over, honouring Retry-After. Each
    200 is one verification of its own, not the flood's."""
    while not stop.is_set():
        t0 = time.monotonic()
        while True:
            s = login("bystander@example.com", "the right password", "198.51.100.1")
            if s == 200 or stop.is_set():
                break
            time.sleep(1)
        if s == 200:
            out.append((time.monotonic() - t0) * 1000)
        time.sleep(0.2)

def addr(i):
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"

scenarios = [
    ("one-email", lambda i: ("victim@example.com", addr(i + 1))),
    ("one-address", lambda i: (f"nobody{i}@example.com", "192.0.2.77")),
    ("spread", lambda i: (f"user{i}@example.com", addr(100000 + i))),
]
print(f"{n} logins at once per scenario; keygate with 1 proxy thread on {len(__import__('os').sched_getaffinity(0))} cores")
print(f"{'scenario':<12} {'verified':>8} {'401':>5} {'429':>5} {'503':>5} {'peak RSS MiB':>13} {'user login ms (max)':>20}")
base = 0
for name, who in scenarios:
    before = metric("keygate_login_verifications_total")
    stop, lat = threading.Event(), []
    user = threading.Thread(target=user_login_latency, args=(stop, lat))
    user.start()
    results, threads = wave(who)
    for t in threads:
        t.join()
    stop.set()
    user.join()
    verified = metric("keygate_login_verifications_total") - before - len(lat)
    _, hwm = rss()
    count = lambda s: sum(1 for r in results if r == s)
    print(f"{name:<12} {verified:>8.0f} {count(401):>5} {count(429):>5} {count(503):>5} {hwm:>13} {max(lat) if lat else 0:>20.0f}")

# Sustained: waves of `spread` for a while, with new emails and addresses.
before = metric("keygate_login_verifications_total")
stop, lat = threading.Event(), []
user = threading.Thread(target=user_login_latency, args=(stop, lat))
user.start()
t0 = time.monotonic()
k, statuses = 0, []
while time.monotonic() - t0 < sustained:
    results, threads = wave(lambda i, k=k: (f"w{k}u{i}@example.com", addr(200000 + k * n + i)))
    for t in threads:
        t.join()
    statuses += results
    k += 1
elapsed = time.monotonic() - t0
stop.set()
user.join()
verified = metric("keygate_login_verifications_total") - before - len(lat)
_, hwm = rss()
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0
print(f"sustained {elapsed:.0f} s: {len(statuses)} logins, {verified:.0f} verified ({verified / elapsed:.0f}/s), "
      f"{sum(1 for s in statuses if s == 503)} answered 503; peak RSS {hwm} MiB; "
      f"a real user's login p50 {p(0.5):.0f} ms, max {p(1.0):.0f} ms ({len(lat)} logins)")
PY
