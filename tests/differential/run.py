#!/usr/bin/env python3
"""Differential request-smuggling test: hostile payloads through a real
keygate binary to a strict upstream (h11), then invariants over what the
upstream framed and what the clients received.

    python3 tests/differential/run.py --keygate PATH --corpus tests/corpus/smuggling.jsonl \
        [--only SUBSTRING] [--jobs N] [--keep] [--verbose]

Prints each failing payload (name, invariant, evidence), then a final line
`N passed, M failed` (payload counts); exits 1 when anything failed.
See tests/differential/README.md for what each invariant means.
"""

import argparse
import base64
import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
UPSTREAM = os.path.join(REPO, "tests", "support", "strict_upstream.py")

HS_SECRET = "integration-test-secret-of-at-least-32-bytes"
PROBE_KEY = "vmc_probe_0123456789"
PROBE_ID = "probe"
CLIENT_TIMEOUT = 5.0
CLIENT_CAP = 1 << 20
# keygate's own identity headers for an API key without a user.
OWN_AUTH = {"x-auth-subject", "x-auth-tier", "x-auth-permissions", "x-auth-method", "x-auth-key-id"}

# The policy, shared with tests/smuggling.rs.
CONFIG = os.path.join(REPO, "tests", "fixtures", "edge.toml")


# ------------------------------------------------------------ processes

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_upstream(tmp):
    log = os.path.join(tmp, "upstream.log")
    open(log, "w").close()
    proc = subprocess.Popen([sys.executable, UPSTREAM, "--log", log, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "upstream.err"), "w"))
    line = proc.stdout.readline().decode()
    m = re.match(r"PORT (\d+)", line)
    if not m:
        raise SystemExit("strict upstream did not start: %r" % line)
    return proc, int(m.group(1)), log


def http_get_status(port, path, timeout=1.0):
    """Status of GET http://127.0.0.1:port/path, by hand (no proxies)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path).encode())
            data = s.recv(64)
        m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def start_keygate(binary, tmp, upstream_port):
    listen, admin = free_port(), free_port()
    cfg = os.path.join(tmp, "keygate.toml")
    with open(cfg, "w") as f:
        with open(CONFIG) as template:
            text = template.read()
        for name, value in (("listen", "127.0.0.1:%d" % listen), ("admin", "127.0.0.1:%d" % admin),
                            ("upstream", "http://127.0.0.1:%d" % upstream_port),
                            ("state", os.path.join(tmp, "state"))):
            text = text.replace("{%s}" % name, value)
        f.write(text)
    env = dict(os.environ, KEYGATE_TEST_HS=HS_SECRET, RUST_LOG="warn")
    err_path = os.path.join(tmp, "keygate.stderr")
    proc = subprocess.Popen([binary, "run", "-c", cfg], env=env,
                            stdout=open(os.path.join(tmp, "keygate.stdout"), "w"),
                            stderr=open(err_path, "w"))
    deadline = time.time() + 30
    while True:
        if proc.poll() is not None:
            check = subprocess.run([binary, "check", "-c", cfg], env=env, capture_output=True, text=True)
            raise SystemExit("keygate exited with %s:\n%s\n--- keygate check:\n%s%s" % (
                proc.returncode, read(err_path), check.stdout, check.stderr))
        if http_get_status(admin, "/healthz") == 200:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                return proc, listen, err_path
            except OSError:
                pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("keygate did not become healthy in 30 s:\n%s" % read(err_path))
        time.sleep(0.05)


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- client

STATUS_RE = re.compile(rb"(?:^|\n)HTTP/1\.[01] (\d{3})")
SEQ_RE = re.compile(rb"(?im)^x-upstream-seq:[ \t]*(\d+)")


def send(port, entry):
    payload = entry["payload"].encode("latin-1")
    started = time.time()
    deadline = started + CLIENT_TIMEOUT
    got = bytearray()
    ended = "eof"
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    except OSError as e:
        return {"name": entry["name"], "bytes": b"", "ended": "connect failed: %s" % e,
                "elapsed": 0.0, "statuses": [], "seqs": []}
    try:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            ended = "send: %s" % e.__class__.__name__
        while len(got) < CLIENT_CAP:
            left = deadline - time.time()
            if left <= 0:
                ended = "timeout"
                break
            s.settimeout(left)
            try:
                d = s.recv(65536)
            except socket.timeout:
                ended = "timeout"
                break
            except ConnectionResetError:
                ended = "reset"
                break
            except OSError as e:
                ended = "error: %s" % e
                break
            if not d:
                break
            got.extend(d)
        else:
            ended = "cap"
    finally:
        s.close()
    data = bytes(got)
    return {
        "name": entry["name"],
        "bytes": data,
        "ended": ended,
        "elapsed": time.time() - started,
        "statuses": [int(m) for m in STATUS_RE.findall(data)],
        "seqs": [int(m) for m in SEQ_RE.findall(data)],
    }


# -------------------------------------------------------- invariant logic

NAME_IN_TARGET = re.compile(r"/(?:public|private)/([a-z0-9][a-z0-9-]*)")
NAME_IN_RAW = re.compile(rb"/(?:public|private)/([a-z0-9][a-z0-9-]*)|(?i:x-corpus):[ \t]*([a-z0-9][a-z0-9-]*)")


def direct_owner(req, names):
    """The payload a framed request names itself (target or X-Corpus)."""
    for m in NAME_IN_TARGET.finditer(req.get("target", "")):
        if m.group(1) in names:
            return m.group(1)
    for n, v in req.get("headers", []):
        if n.lower() == "x-corpus" and v.strip() in names:
            return v.strip()
    return None


def owner_in_raw(raw, names):
    last = None
    for m in NAME_IN_RAW.finditer(raw):
        n = (m.group(1) or m.group(2) or b"").decode("latin-1")
        if n in names:
            last = n
    return last


def normalise(target):
    """What an upstream router could make of a target: (path, steps taken)."""
    steps = []
    t = target
    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*", t)
    if m:
        t = t[m.end():] or "/"
        steps.append("absolute-form")
    if "#" in t:
        t = t.split("#", 1)[0]
        steps.append("fragment")
    t = t.split("?", 1)[0]
    dec = re.sub(r"%([0-9A-Fa-f]{2})",
                 lambda m: m.group(0) if m.group(1).lower() == "2f" else chr(int(m.group(1), 16)), t)
    if dec != t:
        steps.append("percent-decoding")
        t = dec
    if "\\" in t:
        t = t.replace("\\", "/")
        steps.append("backslash")
    if ";" in t:
        t = "/".join(s.split(";", 1)[0] for s in t.split("/"))
        steps.append("path-parameters")
    out = []
    for s in t.split("/"):
        if s in ("", "."):
            continue
        if s == "..":
            if out:
                out.pop()
            continue
        out.append(s)
    n = "/" + "/".join(out)
    if n.rstrip("/") != t.rstrip("/"):
        steps.append("dot-segments/slashes")
    return n, steps


def is_websocket(req):
    hs = [(n.lower(), v) for n, v in req.get("headers", [])]
    ups = [t.strip().lower() for n, v in hs if n == "upgrade" for t in v.split(",") if t.strip()]
    return req.get("method") == "GET" and bool(ups) and all(t == "websocket" for t in ups)


def is_admin(path):
    return path == "/admin" or path.startswith("/admin/")


def show(s, limit=160):
    r = repr(s)
    return r if len(r) <= limit else r[:limit] + "...'"


def check(entries, results, log_path, keygate_alive, keygate_rc, keygate_err, verbose):
    names = [e["name"] for e in entries]
    name_set = set(names)
    results_by = {r["name"]: r for r in results}
    fails = {n: [] for n in names}
    unattributed = []
    notes = {n: [] for n in names}

    def fail(owner, inv, msg):
        if owner is None:
            unattributed.append("(%s) %s" % (inv, msg))
        else:
            fails[owner].append("(%s) %s" % (inv, msg))

    records = []
    with open(log_path, encoding="utf-8") as f:
        for ln in f:
            ln = ln.strip()
            if ln:
                try:
                    records.append(json.loads(ln))
                except ValueError:
                    unattributed.append("(e) unparsable upstream log line: %s" % show(ln))

    # Attribute each request and error line: its own name, else the request
    # before it on the same upstream connection (it was carried in that one).
    last_owner_on_conn = {}
    requests = {}  # seq -> (record, owner, how)
    errors = []
    truncations = []
    for r in records:
        conn = r.get("conn")
        if "seq" in r:
            own = direct_owner(r, name_set)
            how = "own"
            if own is None:
                own = last_owner_on_conn.get(conn)
                how = "carried" if own else "unattributed"
            else:
                last_owner_on_conn[conn] = own
            requests[r["seq"]] = (r, own, how)
        elif "error" in r or r.get("event") == "truncated":
            raw = base64.b64decode(r.get("raw_b64", ""))
            own = None
            if r.get("request"):
                own = direct_owner(r["request"], name_set)
            if own is None:
                own = owner_in_raw(raw, name_set)
            if own is None:
                own = last_owner_on_conn.get(conn)
            (errors if "error" in r else truncations).append((r, own, raw))

    seq_owner = {s: o for s, (_, o, _) in requests.items()}
    seen_by = {}
    for r in results:
        for s in set(r["seqs"]):
            seen_by.setdefault(s, []).append(r["name"])

    # (a) every request the upstream framed (and answered) reached a client,
    #     the client that sent it.
    answered = {s for s, (r, _, _) in requests.items() if not r.get("unanswered")}
    # A client that received another payload's answer is a victim (of a
    # poisoned pooled connection); its own answer then goes on to the next
    # client, and so on. Blame the start of such a chain: a smuggled request,
    # or an owner that was not itself a victim.
    victims = {}
    misdelivered = []
    for r in results:
        for s in sorted(set(r["seqs"])):
            if s not in requests:
                fail(r["name"], "a", "received x-upstream-seq %d that the upstream never framed" % s)
                continue
            o = seq_owner[s]
            if o != r["name"]:
                victims.setdefault(r["name"], set()).add(o or "(unattributed)")
                misdelivered.append((s, r["name"]))
    for s, client in misdelivered:
        req, o, how = requests[s]
        msg = "the answer to %s %s (seq %d, %s) went to another client: %s" % (
            req["method"], show(req["target"], 80), s, how, client)
        if how == "own" and o in victims:
            notes[o].append(msg + " (collateral: this client itself received the answer meant for %s)"
                            % ", ".join(sorted(victims[o])))
        else:
            fail(o, "a", msg)
    for s in sorted(answered):
        if s in seen_by:
            continue
        req, o, how = requests[s]
        if o in victims and how == "own":
            notes[o].append("its own answer (seq %d) was lost: collateral of %s" % (
                s, ", ".join(sorted(victims[o]))))
            continue
        fail(o, "a", "upstream framed and answered %s %s (seq %d, conn %s, %s) but no client received it" % (
            req["method"], show(req["target"], 80), s, req["conn"], how if how != "own" else "its own request"))

    for s, (req, o, how) in sorted(requests.items()):
        tag = "seq %d, conn %s%s" % (s, req["conn"], ", smuggled in " + o if how == "carried" else "")
        # (b) nothing that means /admin.
        path, steps = normalise(req["target"])
        if is_admin(path):
            fail(o, "b", "upstream framed %s %s (%s) -> %s%s" % (
                req["method"], show(req["target"], 80), tag, path,
                " via " + ", ".join(steps) if steps else ""))
        # (c) no identity headers but keygate's own; no underscores.
        authenticated = req["target"].startswith("/private/") and how == "own"
        own_seen = {}
        for where, fields in (("header", req.get("headers", [])), ("trailer", req.get("trailers", []))):
            for n, v in fields:
                canon = n.lower().replace("_", "-")
                if "_" in n:
                    fail(o, "c", "%s with an underscore reached the upstream: %s: %s (%s)" % (
                        where, show(n, 60), show(v, 60), tag))
                    continue
                if canon.startswith("x-auth-"):
                    ok = (authenticated and where == "header" and n in OWN_AUTH)
                    if ok:
                        own_seen[n] = own_seen.get(n, 0) + 1
                        if n in ("x-auth-subject", "x-auth-key-id") and v != PROBE_ID:
                            ok = False
                    if not ok:
                        fail(o, "c", "%s %s: %s reached the upstream (%s)" % (where, n, show(v, 60), tag))
        for n, k in own_seen.items():
            if k > 1:
                fail(o, "c", "keygate's %s arrived %d times (%s)" % (n, k, tag))
        if authenticated and own_seen and set(own_seen) != OWN_AUTH:
            fail(o, "c", "keygate's identity headers incomplete: %s (%s)" % (sorted(own_seen), tag))
        # (d) exactly one X-Request-Id, never the smuggled one.
        ids = [v for n, v in req.get("headers", []) if n.lower() == "x-request-id"]
        tids = [v for n, v in req.get("trailers", []) if n.lower() == "x-request-id"]
        if len(ids) != 1:
            fail(o, "d", "%d X-Request-Id headers %s (%s)" % (len(ids), show(ids, 80), tag))
        if tids:
            fail(o, "d", "X-Request-Id in trailers %s (%s)" % (show(tids, 80), tag))
        if any(v.strip().lower() == "smuggled" for v in ids + tids):
            fail(o, "d", "X-Request-Id: smuggled reached the upstream (%s)" % tag)

    # (e) the upstream could frame everything keygate sent.
    warnings = []
    for r, o, raw in errors:
        req = r.get("request")
        if r["error"].startswith("upgrade/connect") and req and is_websocket(req):
            # keygate relays WebSocket upgrades by design; the strict upstream
            # cannot speak it. Not a framing error.
            warnings.append((o or "(unattributed)", "WebSocket upgrade reached the upstream (keygate relays these by design; "
                                                      "the strict upstream closed): %s" % show(r["error"], 120)))
            continue
        what = " after head %s %s" % (req["method"], show(req["target"], 60)) if req else ""
        fail(o, "e", "strict upstream refused keygate's bytes on conn %s%s: %s; last bytes %s" % (
            r.get("conn"), what, r["error"], show(raw[-200:].decode("latin-1"), 240)))

    # (f) keygate alive; every client got a status line or a clean close.
    crash = None
    if not keygate_alive:
        crash = "keygate exited during the run (code %s)" % keygate_rc
    n_panics = keygate_err.count("panicked at")
    if n_panics:
        i = keygate_err.index("panicked at")
        crash = (crash + "; " if crash else "") + "keygate logged %d panic(s), the first: %s" % (
            n_panics, show(keygate_err[i:i + 120].split("\nstack backtrace")[0], 200))
    silent = set()
    for r in results:
        if r["statuses"]:
            if r["ended"] not in ("eof",):
                warnings.append((r["name"], "connection ended by %s after %d response(s)" % (
                    r["ended"], len(r["statuses"]))))
            if 504 in r["statuses"]:
                warnings.append((r["name"], "a 504: the upstream was still waiting for bytes keygate "
                                            "considered complete (framing disagreement?)"))
        elif r["ended"] == "eof" and not r["bytes"]:
            silent.add(r["name"])  # a clean close
        else:
            warnings.append((r["name"], "no HTTP response; %s after %d bytes %s" % (
                r["ended"], len(r["bytes"]), show(r["bytes"][:80].decode("latin-1"), 120))))

    return {
        "fails": fails, "unattributed": unattributed, "notes": notes, "warnings": warnings,
        "crash": crash, "framed": len(answered), "seen": len(set(seen_by) & answered),
        "truncations": len(truncations), "errors": len(errors), "requests": len(requests),
        "silent": len(silent - {r["name"] for r in results if r["statuses"]}),
    }


# ------------------------------------------------------- panic bisection

def panics(err_path):
    return read(err_path).count("panicked at")


def bisect_panics(port, err_path, entries, results, keygate, limit=800):
    """Re-send, one at a time, the payloads whose clients got no answer and
    see which make keygate log a panic. Returns ({name: excerpt}, skipped)."""
    found = {}
    by_name = {e["name"]: e for e in entries}
    cands = [r["name"] for r in results if not r["statuses"]]
    skipped = max(0, len(cands) - limit)
    for name in cands[:limit]:
        if keygate.poll() is not None:
            break
        size = os.path.getsize(err_path)
        send(port, by_name[name])
        # The panic is written before the connection is dropped, so it is
        # normally there when send() returns; allow a little slack.
        deadline = time.time() + 0.1
        while time.time() < deadline:
            if os.path.getsize(err_path) > size:
                time.sleep(0.05)
                with open(err_path, "rb") as f:
                    f.seek(size)
                    new = f.read().decode("utf-8", "replace")
                if "panicked at" in new:
                    i = new.index("panicked at")
                    found[name] = new[i:i + 120].split("\nstack backtrace")[0]
                    break
                size = os.path.getsize(err_path)
            time.sleep(0.01)
    return found, skipped


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser(description="Differential request-smuggling test for keygate.")
    ap.add_argument("--keygate", required=True, help="keygate binary (a copy, not target/)")
    ap.add_argument("--corpus", default=os.path.join(REPO, "tests", "corpus", "smuggling.jsonl"))
    ap.add_argument("--only", action="append", default=[],
                    help="run payloads whose name or family contains this (repeatable)")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, config)")
    ap.add_argument("--verbose", "-v", action="store_true", help="also print warnings and notes")
    ap.add_argument("--no-retry", action="store_true",
                    help="no second, sequential pass for passing payloads that got a 502/504 or no answer")
    args = ap.parse_args()

    entries = []
    with open(args.corpus, encoding="ascii") as f:
        for ln in f:
            if ln.strip():
                entries.append(json.loads(ln))
    if args.only:
        entries = [e for e in entries if any(o in e["name"] or o == e["family"] for o in args.only)]
    if not entries:
        raise SystemExit("no payloads selected")

    tmp = tempfile.mkdtemp(prefix="keygate-diff-")
    upstream = keygate = None
    try:
        upstream, up_port, log_path = start_upstream(tmp)
        keygate, port, err_path = start_keygate(os.path.abspath(args.keygate), tmp, up_port)
        t0 = time.time()
        done = [0]
        lock = threading.Lock()

        def run_one(e):
            r = send(port, e)
            with lock:
                done[0] += 1
                if sys.stderr.isatty() and done[0] % 100 == 0:
                    sys.stderr.write("\r%d/%d" % (done[0], len(entries)))
            return r

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(run_one, entries))
        if sys.stderr.isatty():
            sys.stderr.write("\r")
        time.sleep(1.0)
        # Second pass: a payload that passed but got no answer from the
        # upstream (502/504) or none at all may have met a pooled upstream
        # connection another payload had broken or poisoned. Send those again,
        # one at a time, so that their verdict does not depend on scheduling.
        alive = keygate.poll() is None
        first = check(entries, results, log_path, alive, keygate.returncode, read(err_path), args.verbose)
        by_name = {e["name"]: e for e in entries}
        retried = 0
        if alive and not args.no_retry:
            for r in list(results):
                if first["fails"][r["name"]] or not (502 in r["statuses"] or 504 in r["statuses"]
                                                     or not r["statuses"]):
                    continue
                for _ in range(2):
                    again = send(port, by_name[r["name"]])
                    results.append(again)
                    retried += 1
                    if again["statuses"] and not ({502, 504} & set(again["statuses"])):
                        break
            time.sleep(1.0 if retried else 0)
        alive = keygate.poll() is None
        rc = keygate.returncode
        report = check(entries, results, log_path, alive, rc, read(err_path), args.verbose)
        report["retried"] = retried
        elapsed = time.time() - t0
        report["panickers"], report["panic_skipped"] = {}, 0
        if alive and panics(err_path):
            # After the invariants: the re-sends add to the upstream log.
            report["panickers"], report["panic_skipped"] = bisect_panics(
                port, err_path, entries, results, keygate)
            for name, excerpt in report["panickers"].items():
                report["fails"][name].append("(f) keygate panicked on this payload: " + show(excerpt, 200))
    finally:
        stop(keygate)
        stop(upstream)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    fam = {e["name"]: e["family"] for e in entries}
    failed = [e["name"] for e in entries if report["fails"][e["name"]]]
    for name in failed:
        print("FAIL %s [%s]" % (name, fam[name]))
        for msg in report["fails"][name]:
            print("  " + msg)
        for msg in report["notes"][name]:
            print("  note: " + msg)
    if report["unattributed"]:
        print("FAIL (not attributable to one payload)")
        for msg in report["unattributed"]:
            print("  " + msg)
    if args.verbose:
        for name, msg in report["warnings"]:
            print("WARN %s: %s" % (name, msg))
        for name in (e["name"] for e in entries):
            if not report["fails"][name]:
                for msg in report["notes"][name]:
                    print("NOTE %s: %s" % (name, msg))
    if report["crash"]:
        print("FAIL (f) " + report["crash"])
        if report["panickers"]:
            print("  re-sent alone, these payloads panic it: " + ", ".join(sorted(report["panickers"])))
        elif report["panic_skipped"] == 0:
            print("  no single payload reproduced it when re-sent alone")
        if report["panic_skipped"]:
            print("  (%d payloads without an answer were not re-sent)" % report["panic_skipped"])
    by_inv = {}
    for name in failed:
        for inv in sorted({m[1] for m in report["fails"][name]}):
            by_inv[inv] = by_inv.get(inv, 0) + 1
    print("-- %d payloads (+%d sequential re-sends) in %.1f s; upstream framed %d answered request(s), clients received %d of them "
          "(a: %s); %d upstream framing error(s); %d truncated body(ies); %d payload(s) only ever met a "
          "silent close; %d client warning(s)%s" % (
              len(entries), report["retried"], elapsed, report["framed"], report["seen"],
              "equal" if report["framed"] == report["seen"] else "NOT equal",
              report["errors"], report["truncations"], report["silent"], len(report["warnings"]),
              "" if args.verbose else " (-v shows them)"))
    if by_inv:
        print("-- failing payloads by invariant: " + ", ".join("%s=%d" % kv for kv in sorted(by_inv.items())))
    if args.keep:
        print("-- logs kept in " + tmp)
    print("%d passed, %d failed" % (len(entries) - len(failed), len(failed)))
    bad = failed or report["unattributed"] or report["crash"] or report["framed"] != report["seen"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
