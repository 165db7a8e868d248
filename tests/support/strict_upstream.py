#!/usr/bin/env python3
"""A strict reference upstream for request-smuggling tests.

Every byte that arrives is framed by h11 (a strict, independent HTTP/1.1
parser). Each complete request becomes one JSON line in the log; anything h11
refuses becomes an error line. The differential runner
(tests/differential/run.py) compares this log with what the clients of the
proxy under test received.

    python3 strict_upstream.py --log FILE [--port 0]

prints `PORT <n>` once listening on 127.0.0.1, then serves until killed.

Log lines (one JSON object each, flushed before the answer is written):

    {"conn": 3, "event": "open"}
    {"conn": 3, "seq": 17, "method": "GET", "target": "/public/x", "version": "1.1",
     "headers": [["Host", "h"], ...], "trailers": [...], "body_len": 0, "body_b64": ""}
    {"conn": 3, "error": "illegal chunk header: ...", "raw_b64": "...",
     "request": {"method": ..., "target": ..., "version": ..., "headers": ...}}
    {"conn": 3, "event": "truncated", "detail": "...", "raw_b64": "..."}
    {"conn": 3, "event": "close"}

`request` (on error and truncated lines) is the head h11 had accepted when
the body went wrong, if any. `truncated` means the peer closed in the middle of a request body: the message
was abandoned, not mis-framed. A request that proposes a protocol switch
(Upgrade, CONNECT) is logged with `"unanswered": true` and followed by an
error line; the connection is then closed without an answer.

A request header `x-test-delay-ms: N` delays its answer by N ms (at most 2000).

Standard library and h11 only.
"""

import argparse
import base64
import itertools
import json
import socket
import sys
import threading
import time

import h11

RAW_KEEP = 4096
MAX_DELAY_MS = 2000
# Small reads, so that h11's 16 KiB limit on an incomplete head, chunk line
# or trailer section applies the same way however the bytes were segmented.
RECV = 4096


class Log:
    def __init__(self, path):
        self._f = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def write(self, record, with_seq=False):
        """Append one record; with_seq assigns the next global seq under the lock."""
        with self._lock:
            if with_seq:
                record["seq"] = next(self._seq)
                # Keep "conn" and "seq" first for people reading the log.
                record = {"conn": record.pop("conn"), "seq": record.pop("seq"), **record}
            self._f.write(json.dumps(record, ensure_ascii=True) + "\n")
            self._f.flush()
            return record.get("seq")


def latin1(b):
    return bytes(b).decode("latin-1")


def b64(b):
    return base64.b64encode(bytes(b)).decode("ascii")


def serve_conn(sock, conn_id, log):
    raw = bytearray()  # the last RAW_KEEP bytes received, for error evidence
    log.write({"conn": conn_id, "event": "open"})
    h = h11.Connection(h11.SERVER)
    request = None
    body = bytearray()
    eof = False
    try:
        sock.settimeout(120)
        while True:
            state = h.their_state
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as e:
                if eof and state is h11.SEND_BODY:
                    record = {"conn": conn_id, "event": "truncated", "detail": str(e),
                              "raw_b64": b64(raw)}
                    if request is not None:
                        record["request"] = describe(request)
                    log.write(record)
                else:
                    record = {"conn": conn_id, "error": str(e) or repr(e),
                              "eof": eof, "raw_b64": b64(raw)}
                    if request is not None:
                        # The head h11 accepted before the body went wrong.
                        record["request"] = describe(request)
                    log.write(record)
                return
            if event is h11.NEED_DATA:
                if eof:
                    return
                try:
                    data = sock.recv(RECV)
                except (socket.timeout, OSError):
                    data = b""
                if data:
                    raw.extend(data)
                    if len(raw) > RAW_KEEP:
                        del raw[: len(raw) - RAW_KEEP]
                else:
                    eof = True
                h.receive_data(data)
                continue
            if event is h11.PAUSED:
                # Upgrade or CONNECT: h11 stops framing here. A proxy should not
                # have sent this; record the request, then an error, then close.
                record = {"conn": conn_id, "error": "upgrade/connect", "raw_b64": b64(raw)}
                if request is not None:
                    seq = log_request(log, conn_id, request, body, None, unanswered=True)
                    record["error"] = "upgrade/connect: %s %s (seq %s) proposes a protocol switch; h11 paused" % (
                        latin1(request.method), latin1(request.target), seq)
                    record["request"] = describe(request)
                    request = None
                log.write(record)
                return
            if isinstance(event, h11.Request):
                request = event
                body = bytearray()
            elif isinstance(event, h11.Data):
                body.extend(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if request is None:
                    continue
                if h.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    continue  # next_event() reports PAUSED; handled above
                seq = log_request(log, conn_id, request, body, event.headers)
                delay = delay_ms(request)
                if delay:
                    time.sleep(delay / 1000.0)
                answer(sock, h, seq, request.method == b"HEAD")
                request = None
                if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                    return
                try:
                    h.start_next_cycle()
                except h11.LocalProtocolError:
                    return
            elif isinstance(event, h11.ConnectionClosed):
                return
    except h11.LocalProtocolError as e:
        log.write({"conn": conn_id, "error": "local: %s" % e, "raw_b64": b64(raw)})
    except OSError:
        pass
    except Exception as e:  # never die on garbage
        log.write({"conn": conn_id, "error": "internal: %r" % (e,), "raw_b64": b64(raw)})
    finally:
        try:
            sock.close()
        except OSError:
            pass
        log.write({"conn": conn_id, "event": "close"})


def describe(request):
    return {
        "method": latin1(request.method),
        "target": latin1(request.target),
        "version": latin1(request.http_version),
        "headers": [[latin1(n), latin1(v)] for n, v in request.headers.raw_items()],
    }


def log_request(log, conn_id, request, body, trailers, unanswered=False):
    record = {
        "conn": conn_id,
        **describe(request),
        "trailers": [[latin1(n), latin1(v)] for n, v in trailers.raw_items()] if trailers else [],
        "body_len": len(body),
        "body_b64": b64(body),
    }
    if unanswered:
        record["unanswered"] = True
    return log.write(record, with_seq=True)


def delay_ms(request):
    for name, value in request.headers:
        if name == b"x-test-delay-ms":
            try:
                return max(0, min(MAX_DELAY_MS, int(value.strip())))
            except ValueError:
                return 0
    return 0


def answer(sock, h, seq, head):
    payload = json.dumps({"seq": seq}).encode()
    out = h.send(h11.Response(status_code=200, reason=b"OK", headers=[
        ("content-type", "application/json"),
        ("x-upstream-seq", str(seq)),
        ("content-length", str(len(payload))),
    ]))
    if not head:  # a HEAD answer has the length of the body it does not carry
        out += h.send(h11.Data(data=payload))
    out += h.send(h11.EndOfMessage())
    sock.sendall(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", required=True, help="JSON-lines log file (appended to)")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = ap.parse_args()
    log = Log(args.log)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", args.port))
    srv.listen(512)
    sys.stdout.write("PORT %d\n" % srv.getsockname()[1])
    sys.stdout.flush()
    ids = itertools.count(1)
    while True:
        try:
            sock, _ = srv.accept()
        except OSError:
            continue
        t = threading.Thread(target=serve_conn, args=(sock, next(ids), log), daemon=True)
        t.start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
