#!/usr/bin/env python3
"""Build tests/corpus/smuggling.jsonl: hostile HTTP/1.1 payloads for the
differential smuggling runner (tests/differential/run.py).

    python3 tests/corpus/build_corpus.py [--out FILE]

Deterministic: the same script always writes the same file. Each line is

    {"name": "...", "family": "...", "source": "...", "payload": "..."}

where `payload` is the raw bytes as a JSON string, one character per byte
(bytes above 0x7f are written as \\u00XX, i.e. the string is latin-1).

Conventions (the runner relies on them):
  * Host is `h`.
  * The visible request targets `/public/<name>` (a public route), or
    `/private/<name>` with the probe API key for the authenticated family.
    Payloads whose point *is* the target (the `target` family) carry
    `X-Corpus: <name>` instead so that the runner can attribute them.
  * Any hidden/smuggled request targets `/admin/smuggled` (a deny route: it
    must never reach the upstream) and carries `X-Auth-Subject: admin`,
    `X_Auth_Subject: admin` and `X-Request-Id: smuggled`.
  * The client half-closes after sending the payload.

The mutation lists of other tools are reproduced here as data (no code is
copied); every entry's `source` says where it comes from.
"""

import argparse
import json
import os
import re
import sys

CRLF = "\r\n"
NAME = "@@NAME@@"  # replaced by the payload's name
PROBE_KEY = "vmc_probe_0123456789"

SMUG_HEADERS = (
    "Host: h\r\n"
    "X-Auth-Subject: admin\r\n"
    "X_Auth_Subject: admin\r\n"
    "X-Request-Id: smuggled\r\n"
)
# A complete hidden request with no body.
HIDDEN = "GET /admin/smuggled HTTP/1.1\r\n" + SMUG_HEADERS + "\r\n"
# The same, delayed upstream so that its answer arrives after the visible
# one (response-queue poisoning of the next user of a pooled connection).
HIDDEN_DELAYED = ("GET /admin/smuggled HTTP/1.1\r\n" + SMUG_HEADERS
                  + "X-Test-Delay-Ms: 300\r\n\r\n")
# The short one from the lead's finding-1 report.
HIDDEN_MIN = "GET /admin/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"


def hidden_post(swallow):
    """A hidden POST whose Content-Length covers `swallow` trailing bytes after x=1."""
    return ("POST /admin/smuggled HTTP/1.1\r\n" + SMUG_HEADERS
            + "Content-Type: application/x-www-form-urlencoded\r\n"
            + "Content-Length: %d\r\n\r\nx=1" % (3 + len(swallow)))


def line(method="POST", target=None, version="HTTP/1.1"):
    return "%s %s %s\r\n" % (method, target or "/public/" + NAME, version)


def head(method="POST", target=None, headers=(), version="HTTP/1.1", host=True):
    """Request line + headers (each an already-formatted line without CRLF) + blank line."""
    out = line(method, target, version)
    if host:
        out += "Host: h\r\n"
    for h in headers:
        out += h + CRLF
    return out + CRLF


# ---------------------------------------------------------------- sources

SRC_SMUGGLER = "https://github.com/defparam/smuggler configs/%s.py mutations[%r] (MIT, Evan Custodio)"
SRC_BURP = ("https://github.com/PortSwigger/http-request-smuggler src/burp/DesyncBox.java "
            "technique %r (Apache-2.0, James Kettle)")
SRC_PS = "https://portswigger.net/web-security/request-smuggling%s"
SRC_PS_BROWSER = "https://portswigger.net/research/browser-powered-desync-attacks (CL.0 / 0.CL)"
SRC_GARDEN = "https://github.com/narfindustries/http-garden TROPHIES.md%s"
SRC_FUNKY = ("https://w4ke.info/2025/06/18/funky-chunks.html (Jeppe Bonde Weinberger, "
             "'Funky chunks: abusing ambiguous chunk line terminators for request smuggling', 2025)%s")
SRC_RFC = "RFC 9112 %s"
SRC_LEAD = "keygate lead's findings list (differential-test brief)%s"


# ------------------------------------------------------ corpus container

class Corpus:
    def __init__(self):
        self.entries = []
        self.names = set()
        self.templates = set()
        self.dupes = 0

    def add(self, name, family, source, template):
        name = slug(name)
        if name in self.names:
            raise SystemExit("duplicate name %r" % name)
        if template in self.templates:
            self.dupes += 1
            return False
        for ch in template:
            if ord(ch) > 0xFF:
                raise SystemExit("%s: character above 0xff" % name)
        self.names.add(name)
        self.templates.add(template)
        self.entries.append({
            "name": name,
            "family": family,
            "source": source,
            "payload": template.replace(NAME, name),
        })
        return True


def slug(s):
    s = s.lower()
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s


# ---------------------------------------------------- body shapes for TE

def clte(gadget, method="POST", version="HTTP/1.1"):
    """Front-end frames by Content-Length, back-end by chunked: the hidden
    request follows a zero chunk inside the Content-Length body."""
    body = "0\r\n\r\n" + HIDDEN
    return (line(method, None, version) + gadget + CRLF + "Host: h\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            "Content-Length: %d\r\n\r\n" % len(body) + body)


def tecl(gadget, method="POST", version="HTTP/1.1"):
    """Front-end frames by chunked, back-end by Content-Length: the hidden
    request is chunk data; Content-Length covers only the size line."""
    tail = "\r\n0\r\n\r\n"
    smug = hidden_post(tail)
    size = "%x\r\n" % len(smug)
    body = size + smug + tail
    return (line(method, None, version) + gadget + CRLF + "Host: h\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            "Content-Length: %d\r\n\r\n" % len(size) + body)


def add_te_gadget(c, name, family, source, gadget, **kw):
    c.add(name + "-clte", family, source, clte(gadget, **kw))
    c.add(name + "-tecl", family, source, tecl(gadget, **kw))


# ------------------------------------------------- the ten named findings

def findings(c):
    fam = "findings"
    te = "Transfer-Encoding: chunked"
    # 1. A bare LF after the last chunk ends the body for a strict parser
    #    but a lenient one reads on, taking the next request as trailers.
    src = SRC_LEAD % " #1; http-garden TROPHIES.md (bare LF after last chunk)"
    c.add("finding-1-last-chunk-bare-lf", fam, src,
          head("POST", None, [te]) + "0\r\n\n" + HIDDEN_MIN)
    c.add("finding-1-last-chunk-bare-lf-full-hidden", fam, src,
          head("POST", None, [te]) + "0\r\n\n" + HIDDEN)
    c.add("finding-1-last-chunk-bare-lf-delayed-hidden", fam, src,
          head("POST", None, [te]) + "0\r\n\n" + HIDDEN_DELAYED)
    c.add("finding-1-data-then-last-chunk-bare-lf", fam, src,
          head("POST", None, [te]) + "3\r\nabc\r\n0\r\n\n" + HIDDEN)
    c.add("finding-1-trailer-then-bare-lf", fam, src,
          head("POST", None, [te]) + "0\r\nX-T: 1\n\n" + HIDDEN)
    c.add("finding-1-trailer-crlf-then-bare-lf", fam, src,
          head("POST", None, [te]) + "0\r\nX-T: 1\r\n\n" + HIDDEN)
    c.add("finding-1-last-chunk-ext-bare-lf", fam, src,
          head("POST", None, [te]) + "0;a=b\r\n\n" + HIDDEN)

    # 2. An empty Transfer-Encoding (no codings) beside Content-Length.
    src = SRC_LEAD % " #2"
    for slugname, g in [("empty", "Transfer-Encoding:"),
                        ("empty-space", "Transfer-Encoding: "),
                        ("comma", "Transfer-Encoding: ,"),
                        ("space-comma-comma", "Transfer-Encoding:  , ,"),
                        ("tab", "Transfer-Encoding:\t"),
                        ("comma-comma", "Transfer-Encoding: ,,")]:
        add_te_gadget(c, "finding-2-te-" + slugname, fam, src, g)
    c.add("finding-2-te-empty-cl-plain-body", fam, src,
          head("POST", None, ["Transfer-Encoding:", "Content-Length: 3"]) + "x=1" + HIDDEN)
    c.add("finding-2-te-empty-no-cl", fam, src,
          head("POST", None, ["Transfer-Encoding:"]) + "0\r\n\r\n" + HIDDEN)

    # 3. Transfer-Encoding lists and broken chunk lines a lenient parser takes.
    src = SRC_LEAD % " #3"
    for slugname, g in [
        ("chunked-chunked", "Transfer-Encoding: chunked, chunked"),
        ("two-te-headers", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"),
        ("leading-comma", "Transfer-Encoding: ,chunked"),
        ("trailing-comma", "Transfer-Encoding: chunked,"),
        ("identity-chunked", "Transfer-Encoding: identity, chunked"),
        ("gzip-chunked", "Transfer-Encoding: gzip, chunked"),
        ("two-te-headers-identity-first", "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked"),
    ]:
        add_te_gadget(c, "finding-3-" + slugname, fam, src, g)
        c.add("finding-3-" + slugname + "-te-only", fam, src,
              head("POST", None, [g]) + "0\r\n\r\n" + HIDDEN)
    chunk_cases = [
        ("size-5-garbage", "5 garbage\r\nhello\r\n0\r\n\r\n"),
        ("size-5-tab-garbage", "5\tgarbage\r\nhello\r\n0\r\n\r\n"),
        ("size-0-garbage", "0 garbage\r\n\r\n"),
        ("request-line-as-size-line", "5\r\nhello\r\nGET /admin/smuggled HTTP/1.1\r\n\r\n"),
        ("hex-method-request-line-as-size-line", "BAD /admin/smuggled HTTP/1.1\r\n" + SMUG_HEADERS + "\r\n"),
        ("zero-then-request-line-as-size-line", "0 GET /admin/smuggled HTTP/1.1\r\n" + SMUG_HEADERS + "\r\n"),
        ("size-line-bare-lf", "5\nhello\r\n0\r\n\r\n"),
        ("size-line-bare-cr", "5\rhello\r\n0\r\n\r\n"),
        ("ext-bare-lf", "5;a\nhello\r\n0\r\n\r\n"),
        ("ext-bare-cr", "5;a\rhello\r\n0\r\n\r\n"),
        ("data-then-bare-lf", "5\r\nhello\n0\r\n\r\n"),
        ("data-then-bare-cr", "5\r\nhello\r0\r\n\r\n"),
        ("data-then-no-crlf", "5\r\nhello0\r\n\r\n"),
        ("last-chunk-bare-lf-bare-lf", "0\n\n"),
        ("last-chunk-bare-cr", "0\r\r\n"),
        ("huge-ext-20k", "5;" + "a" * 20000 + "\r\nhello\r\n0\r\n\r\n"),
        ("huge-ext-70k", "5;" + "a" * 70000 + "\r\nhello\r\n0\r\n\r\n"),
        ("many-ext", "5" + ";a=b" * 4000 + "\r\nhello\r\n0\r\n\r\n"),
        ("huge-ext-on-last-chunk", "0;" + "x" * 20000 + "\r\n\r\n"),
        ("huge-trailer-section", "0\r\n" + "".join("X-T%d: %s\r\n" % (i, "v" * 100) for i in range(200)) + "\r\n"),
    ]
    for slugname, body in chunk_cases:
        c.add("finding-3-" + slugname, fam, src, head("POST", None, [te]) + body + HIDDEN)

    # 5. A fragment in the request target.
    src = SRC_LEAD % " #5"
    for slugname, target in [("admin-hash", "/admin#"), ("admin-hash-x", "/admin#x"),
                             ("admin-slash-hash", "/admin/#"), ("admin-x-hash", "/admin/x#"),
                             ("admin-hash-query", "/admin#?a=1"), ("admin-query-hash", "/admin?#")]:
        c.add("finding-5-" + slugname, fam, src,
              "GET %s HTTP/1.1\r\nHost: h\r\nX-Corpus: finding-5-%s\r\n\r\n" % (target, slugname))

    # 6. h2c upgrade.
    src = SRC_LEAD % " #6; https://github.com/BishopFox/h2csmuggler"
    settings = "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"
    preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings_frame = "\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    c.add("finding-6-h2c-upgrade", fam, src,
          head("GET", None, ["Upgrade: h2c", settings, "Connection: Upgrade, HTTP2-Settings"])
          + preface + settings_frame)
    c.add("finding-6-h2c-upgrade-then-h1-hidden", fam, src,
          head("GET", None, ["Upgrade: h2c", settings, "Connection: Upgrade, HTTP2-Settings"]) + HIDDEN)
    c.add("finding-6-h2c-upgrade-post-body", fam, src,
          head("POST", None, ["Upgrade: h2c", settings, "Connection: Upgrade, HTTP2-Settings",
                              "Content-Length: 3"]) + "x=1" + preface)
    c.add("finding-6-h2c-upgrade-lowercase", fam, src,
          head("GET", None, ["upgrade: H2C", "http2-settings: AAMAAABkAARAAAAAAAIAAAAA",
                             "connection: upgrade, http2-settings"]) + preface)
    c.add("finding-6-h2c-upgrade-keep-alive", fam, src,
          head("GET", None, ["Upgrade: h2c", settings, "Connection: keep-alive, Upgrade, HTTP2-Settings"])
          + preface)

    # 7. Underscore spellings of identity and forwarding headers.
    src = SRC_LEAD % " #7"
    for slugname, hdrs in [
        ("x-auth-subject-underscore", ["X_Auth_Subject: admin"]),
        ("x-forwarded-for-underscore", ["X_Forwarded_For: 1.2.3.4"]),
        ("both", ["X_Auth_Subject: admin", "X_Forwarded_For: 1.2.3.4"]),
        ("mixed-x-auth-underscore-subject", ["X-Auth_Subject: admin"]),
    ]:
        c.add("finding-7-" + slugname, fam, src, head("GET", None, hdrs))

    # 8. Trailers carry identity headers, bare CR, NUL.
    src = SRC_LEAD % " #8"
    for slugname, trailer in [
        ("x-auth-subject", "X-Auth-Subject: admin\r\n"),
        ("x-auth-subject-underscore", "X_Auth_Subject: admin\r\n"),
        ("x-request-id", "X-Request-Id: smuggled\r\n"),
        ("bare-cr", "X-T: a\rb\r\n"),
        ("nul", "X-T: a\x00b\r\n"),
        ("bare-cr-line", "X-T: a\r"),
        ("content-length", "Content-Length: 40\r\n"),
        ("transfer-encoding", "Transfer-Encoding: chunked\r\n"),
    ]:
        c.add("finding-8-trailer-" + slugname, fam, src,
              head("POST", None, [te, "Trailer: X-Auth-Subject"]) + "3\r\nabc\r\n0\r\n" + trailer + "\r\n")

    # 9. Malformed chunk sizes that lenient integer parsers accept.
    src = SRC_LEAD % " #9; http-garden TROPHIES.md (strtoll / int() chunk sizes)"
    for slugname, size in [("0x5", "0x5"), ("plus-5", "+5"), ("minus-0", "-0"),
                           ("2-64-plus-5", "10000000000000005"),
                           ("f17-5", "fffffffffffffffff5"),
                           ("underscore", "0_5"), ("minus-5", "-5")]:
        c.add("finding-9-chunk-size-" + slugname, fam, src,
              head("POST", None, [te]) + size + "\r\nhello\r\n0\r\n\r\n" + HIDDEN)


# --------------------------------------------------- defparam/smuggler

def smuggler_mutations():
    """(config, name, gadget) exactly as the three configs generate them."""
    out = []
    # configs/default.py
    out += [("default", "nameprefix1", " Transfer-Encoding: chunked"),
            ("default", "tabprefix1", "Transfer-Encoding:\tchunked"),
            ("default", "tabprefix2", "Transfer-Encoding\t:\tchunked"),
            ("default", "space1", "Transfer-Encoding : chunked")]
    for i in [0x1, 0x4, 0x8, 0x9, 0xa, 0xb, 0xc, 0xd, 0x1F, 0x20, 0x7f, 0xA0, 0xFF]:
        ch = chr(i)
        out += [
            ("default", "midspace-%02x" % i, "Transfer-Encoding:%schunked" % ch),
            ("default", "postspace-%02x" % i, "Transfer-Encoding%s: chunked" % ch),
            ("default", "prespace-%02x" % i, "%sTransfer-Encoding: chunked" % ch),
            ("default", "endspace-%02x" % i, "Transfer-Encoding: chunked%s" % ch),
            ("default", "xprespace-%02x" % i, "X: X%sTransfer-Encoding: chunked" % ch),
            ("default", "endspacex-%02x" % i, "Transfer-Encoding: chunked%sX: X" % ch),
            ("default", "rxprespace-%02x" % i, "X: X\r%sTransfer-Encoding: chunked" % ch),
            ("default", "xnprespace-%02x" % i, "X: X%s\nTransfer-Encoding: chunked" % ch),
            ("default", "endspacerx-%02x" % i, "Transfer-Encoding: chunked\r%sX: X" % ch),
            ("default", "endspacexn-%02x" % i, "Transfer-Encoding: chunked%s\nX: X" % ch),
        ]
    # configs/doubles.py
    for i in list(range(0x1, 0x21)) + list(range(0x7F, 0x100)):
        ch = chr(i)
        out += [
            ("doubles", "%02x-%02x-XX-XX" % (i, i), "%sTransfer-Encoding%s: chunked" % (ch, ch)),
            ("doubles", "%02x-XX-%02x-XX" % (i, i), "%sTransfer-Encoding:%schunked" % (ch, ch)),
            ("doubles", "%02x-XX-XX-%02x" % (i, i), "%sTransfer-Encoding: chunked%s" % (ch, ch)),
            ("doubles", "XX-%02x-%02x-XX" % (i, i), "Transfer-Encoding%s:%schunked" % (ch, ch)),
            ("doubles", "XX-%02x-XX-%02x" % (i, i), "Transfer-Encoding%s: chunked%s" % (ch, ch)),
            ("doubles", "XX-XX-%02x-%02x" % (i, i), "Transfer-Encoding:%schunked%s" % (ch, ch)),
        ]
    # configs/exhaustive.py
    out += [
        ("exhaustive", "nameprefix1", " Transfer-Encoding: chunked"),
        ("exhaustive", "tabprefix1", "Transfer-Encoding:\tchunked"),
        ("exhaustive", "tabprefix2", "Transfer-Encoding\t:\tchunked"),
        ("exhaustive", "spacejoin1", "Transfer Encoding: chunked"),
        ("exhaustive", "underjoin1", "Transfer_Encoding: chunked"),
        ("exhaustive", "smashed", "Transfer Encoding:chunked"),
        ("exhaustive", "space1", "Transfer-Encoding : chunked"),
        ("exhaustive", "valueprefix1", "Transfer-Encoding:  chunked"),
        ("exhaustive", "vertprefix1", "Transfer-Encoding:\u000Bchunked"),
        ("exhaustive", "commaCow", "Transfer-Encoding: chunked, cow"),
        ("exhaustive", "cowComma", "Transfer-Encoding: cow, chunked"),
        ("exhaustive", "contentEnc", "Content-Encoding: chunked"),
        ("exhaustive", "linewrapped1", "Transfer-Encoding:\n chunked"),
        ("exhaustive", "quoted", "Transfer-Encoding: \"chunked\""),
        ("exhaustive", "aposed", "Transfer-Encoding: 'chunked'"),
        ("exhaustive", "lazygrep", "Transfer-Encoding: chunk"),
        ("exhaustive", "sarcasm", "TrAnSFer-EnCODinG: cHuNkeD"),
        ("exhaustive", "yelling", "TRANSFER-ENCODING: CHUNKED"),
        ("exhaustive", "0dsuffix", "Transfer-Encoding: chunked\r"),
        ("exhaustive", "tabsuffix", "Transfer-Encoding: chunked\t"),
        ("exhaustive", "revdualchunk", "Transfer-Encoding: cow\r\nTransfer-Encoding: chunked"),
        ("exhaustive", "0dspam", "Transfer\r-Encoding: chunked"),
        ("exhaustive", "nested", "Transfer-Encoding: cow chunked bar"),
        ("exhaustive", "spaceFF", "Transfer-Encoding:\xFFchunked"),
        ("exhaustive", "accentCH", "Transfer-Encoding: ch\x96nked"),
        ("exhaustive", "accentTE", "Transf\x82r-Encoding: chunked"),
        ("exhaustive", "x-rout", "X:X\rTransfer-Encoding: chunked"),
        ("exhaustive", "x-nout", "X:X\nTransfer-Encoding: chunked"),
    ]
    for i in list(range(0x1, 0x20)) + list(range(0x7F, 0x100)):
        ch = chr(i)
        out += [
            ("exhaustive", "midspace-%02x" % i, "Transfer-Encoding:%schunked" % ch),
            ("exhaustive", "postspace-%02x" % i, "Transfer-Encoding%s: chunked" % ch),
            ("exhaustive", "prespace-%02x" % i, "%sTransfer-Encoding: chunked" % ch),
            ("exhaustive", "endspace-%02x" % i, "Transfer-Encoding: chunked%s" % ch),
        ]
    return out


def smuggler(c):
    seen = {}
    order = []
    for config, mname, gadget in smuggler_mutations():
        if gadget in seen:
            seen[gadget][1].append((config, mname))
            continue
        seen[gadget] = (mname, [(config, mname)])
        order.append(gadget)
    for gadget in order:
        mname, where = seen[gadget]
        source = "; ".join(SRC_SMUGGLER % (cfg, n) for cfg, n in where)
        add_te_gadget(c, "smuggler-" + mname, "smuggler-te", source, gadget)


# ------------------------------------------ PortSwigger http-request-smuggler

SPECIAL_CHARS = [0, 9, 11, 12, 13, 127]  # DesyncBox.getSpecialChars()


def burp_te_permutations():
    H = "Transfer-Encoding: "
    V = "chunked"
    p = [
        ("vanilla", H + V),
        ("underjoin1", H.replace("-", "_") + V),
        ("spacejoin1", H.replace("-", " ") + V),
        ("space1", H.replace(":", " :") + V),
        ("nameprefix1", "Foo: bar\r\n " + H + V),
        ("nameprefix2", "Foo: bar\r\n\t" + H + V),
        ("valueprefix1", H + " " + V),
        ("nospace1", H.replace(" ", "") + V),
        ("linewrapped1", H.replace(" ", "\n ") + V),
        ("doublewrapped", H.replace(" ", "\r\n \r\n ") + V),
        ("gareth1", H.replace(":", "\n :") + V),
        ("badsetupCR", "Foo: bar\r" + H + V),
        ("badsetupLF", "Foo: bar\n" + H + V),
        ("vertwrap", H + "\n\u000B" + V),
        ("tabwrap", H + "\r\n\t" + V),
        ("multiCase", "t" + H.upper()[1:] + V),
        ("UPPERCASE", H.upper() + V),
        ("0dwrap", "Foo: bar\r\n\r" + H + V),
        ("0dspam", H[:3] + "\r" + H[3:] + V),
        ("connection", "Connection: Transfer-Encoding\r\n" + H + V),
        ("spjunk", H.replace(":", " x:") + V),
        ("backslash", H.replace("-", "\\") + V),
        ("nel", H.replace(":", "\x85:") + V),
        ("nbsp", H.replace(":", "\xa0:") + V),
        ("shy2", H.replace(":", "\xad:") + V),
        ("shy", H.replace("-", "\xad") + V),
        ("spaceFF", H[:-1] + "\xff" + V),
        ("unispace", H[:-1] + "\xa0" + V),
        ("0dsuffix", H + V + "\r"),
        ("tabsuffix", H + V + "\t"),
        ("commaCow", H + "chunked, identity"),
        ("cowComma", H + "identity, " + V),
        ("contentEnc", "Content-Encoding: " + V),
        ("quoted", H + "\"chunked\""),
        ("aposed", H + "'chunked'"),
        ("dualchunk", H + V + "\r\nTransfer-encoding: identity"),
        ("lazygrep", H + "chunk"),
        ("revdualchunk", H + "identity\r\n" + H + V),
        ("bodysplit", "X: y\r\nFoo: barn\n\nTransfer-Encoding: chunked"),
        ("nested", H + "identity, chunked, identity"),
        ("encode", "Transfer-%45ncoding: chunked"),
        ("h1case", H.upper() + V),
        ("qencode", H + "=?iso-8859-1?B?Y2h1bmtlZA==?="),
        ("qencodeutf", H + "=?UTF-8?B?Y2h1bmtlZA==?="),
        ("accentTE", "Transf\x82r-Encoding: " + V),
        ("accentCH", H + "ch\x96nked"),
        ("badwrap", " " + H + V + "\r\nX-Blah-Ignore: " + V),
    ]
    for i in SPECIAL_CHARS:
        ch = chr(i)
        p += [
            ("spacefix1:%d" % i, H.replace(" ", "") + ch + V),
            ("prefix1:%d" % i, H + ch + V),
            ("suffix1:%d" % i, H + V + ch),
            ("namesuffix1:%d" % i, H.replace(":", ch + ":") + V),
        ]
    return p


def burp_te(c):
    fam = "burp-te"
    for tech, gadget in burp_te_permutations():
        add_te_gadget(c, "burp-te-" + tech, fam, SRC_BURP % tech, gadget)
    # Method / version techniques applied to the vanilla gadget.
    vanilla = "Transfer-Encoding: chunked"
    for tech, kw in [("get", {"method": "GET"}), ("options", {"method": "OPTIONS"}),
                     ("head", {"method": "HEAD"}), ("http1.0", {"version": "HTTP/1.0"})]:
        add_te_gadget(c, "burp-te-" + tech, fam, SRC_BURP % tech, vanilla, **kw)
    add_te_gadget(c, "burp-te-range", fam, SRC_BURP % "range", vanilla + "\r\nRange: bytes=0-0")


def burp_cl_permutations():
    """(technique, f(n) -> Content-Length line(s))."""
    H = "Content-Length: "
    p = [
        ("vanilla", lambda n: H + n),
        ("underjoin1", lambda n: H.replace("-", "_") + n),
        ("spacejoin1", lambda n: H.replace("-", " ") + n),
        ("space1", lambda n: H.replace(":", " :") + n),
        ("nameprefix1", lambda n: "Foo: bar\r\n " + H + n),
        ("nameprefix2", lambda n: "Foo: bar\r\n\t" + H + n),
        ("valueprefix1", lambda n: H + " " + n),
        ("nospace1", lambda n: H.replace(" ", "") + n),
        ("linewrapped1", lambda n: H.replace(" ", "\n ") + n),
        ("doublewrapped", lambda n: H.replace(" ", "\r\n \r\n ") + n),
        ("gareth1", lambda n: H.replace(":", "\n :") + n),
        ("badsetupCR", lambda n: "Foo: bar\r" + H + n),
        ("badsetupLF", lambda n: "Foo: bar\n" + H + n),
        ("vertwrap", lambda n: H + "\n\u000B" + n),
        ("tabwrap", lambda n: H + "\r\n\t" + n),
        ("multiCase", lambda n: "c" + H.upper()[1:] + n),
        ("UPPERCASE", lambda n: H.upper() + n),
        ("0dwrap", lambda n: "Foo: bar\r\n\r" + H + n),
        ("0dspam", lambda n: H[:3] + "\r" + H[3:] + n),
        ("connection", lambda n: "Connection: Content-Length\r\n" + H + n),
        ("spjunk", lambda n: H.replace(":", " x:") + n),
        ("backslash", lambda n: H.replace("-", "\\") + n),
        ("nel", lambda n: H.replace(":", "\x85:") + n),
        ("nbsp", lambda n: H.replace(":", "\xa0:") + n),
        ("shy2", lambda n: H.replace(":", "\xad:") + n),
        ("shy", lambda n: H.replace("-", "\xad") + n),
        ("spaceFF", lambda n: H[:-1] + "\xff" + n),
        ("unispace", lambda n: H[:-1] + "\xa0" + n),
        ("0dsuffix", lambda n: H + n + "\r"),
        ("tabsuffix", lambda n: H + n + "\t"),
        ("CL-plus", lambda n: H + "+" + n),
        ("CL-minus", lambda n: H + "-" + n),
        ("CL-pad", lambda n: H + "0" + n),
        ("CL-bigpad", lambda n: H + "00000000000" + n),
        ("CL-spacepad", lambda n: H + "0 " + n),
        ("CL-e", lambda n: H + n + "e0"),
        ("CL-dec", lambda n: H + n + ".0"),
        ("CL-commaprefix", lambda n: H + "0, " + n),
        ("CL-commasuffix", lambda n: H + n + ", 0"),
        ("CL-expect", lambda n: H + n + "\r\nExpect: 100-continue"),
        ("CL-expect-obfs", lambda n: H + n + "\r\nExpect: x 100-continue"),
        ("CL-error", lambda n: "X-Invalid Y: \r\n" + H + n),
    ]
    for i in SPECIAL_CHARS:
        ch = chr(i)
        p += [
            ("spacefix1:%d" % i, lambda n, ch=ch: H.replace(" ", "") + ch + n),
            ("prefix1:%d" % i, lambda n, ch=ch: H + ch + n),
            ("suffix1:%d" % i, lambda n, ch=ch: H + n + ch),
            ("namesuffix1:%d" % i, lambda n, ch=ch: H.replace(":", ch + ":") + n),
        ]
    return p


def cl_shapes(cl_line, method="POST"):
    """long: Content-Length covers x=1 + the hidden request (a back-end that
    reads a smaller length frames the hidden one); short: Content-Length 3,
    the hidden request pipelined after (a front-end that reads a larger
    length forwards it as body)."""
    long_body = "x=1" + HIDDEN
    long_ = (line(method) + "Host: h\r\n" + cl_line(str(len(long_body))) + "\r\n\r\n" + long_body)
    short = (line(method) + "Host: h\r\n" + cl_line("3") + "\r\n\r\n" + "x=1" + HIDDEN)
    return long_, short


def burp_cl(c):
    fam = "burp-cl"
    for tech, f in burp_cl_permutations():
        long_, short = cl_shapes(f)
        c.add("burp-cl-%s-long" % tech, fam, SRC_BURP % tech, long_)
        c.add("burp-cl-%s-short" % tech, fam, SRC_BURP % tech, short)


# ------------------------------------------------------------ PortSwigger

def portswigger(c):
    te = "Transfer-Encoding: chunked"
    # CL.TE and TE.CL, the textbook forms.
    src = SRC_PS % "/finding (CL.TE)"
    body = "0\r\n\r\nG"
    c.add("ps-clte-gpost", "portswigger-clte", src,
          head("POST", None, ["Content-Length: %d" % len(body), te]) + body + HIDDEN)
    body = "0\r\n\r\n" + HIDDEN
    c.add("ps-clte-hidden", "portswigger-clte", src,
          head("POST", None, ["Content-Length: %d" % len(body), te]) + body)
    c.add("ps-clte-hidden-te-first", "portswigger-clte", src,
          head("POST", None, [te, "Content-Length: %d" % len(body)]) + body)
    c.add("ps-clte-delayed", "portswigger-clte", src,
          head("POST", None, ["Content-Length: %d" % len("0\r\n\r\n" + HIDDEN_DELAYED), te])
          + "0\r\n\r\n" + HIDDEN_DELAYED)
    src = SRC_PS % "/finding (TE.CL)"
    tail = "\r\n0\r\n\r\n"
    smug = hidden_post(tail)
    body = "%x\r\n" % len(smug) + smug + tail
    c.add("ps-tecl-hidden", "portswigger-tecl", src,
          head("POST", None, ["Content-Length: 4", te]) + body)
    c.add("ps-tecl-hidden-te-first", "portswigger-tecl", src,
          head("POST", None, [te, "Content-Length: 4"]) + body)
    c.add("ps-tecl-cl-zero", "portswigger-tecl", src,
          head("POST", None, ["Content-Length: 0", te]) + body)

    # TE.TE obfuscation list from the Web Security Academy, plus the lead's.
    src = SRC_PS % " (TE.TE: obfuscating the TE header)"
    for slugname, g in [
        ("xchunked", "Transfer-Encoding: xchunked"),
        ("space-before-colon", "Transfer-Encoding : chunked"),
        ("chunked-then-x", "Transfer-Encoding: chunked\r\nTransfer-Encoding: x"),
        ("x-then-chunked", "Transfer-Encoding: x\r\nTransfer-Encoding: chunked"),
        ("tab-value", "Transfer-Encoding:\tchunked"),
        ("space-name-prefix", " Transfer-Encoding: chunked"),
        ("x-lf-te", "X: X\nTransfer-Encoding: chunked"),
        ("name-lf-colon", "Transfer-Encoding\n: chunked"),
        ("chunked-false", "Transfer-Encoding: chunked-false"),
        ("lower-e", "Transfer-encoding: chunked"),
        ("upper", "TRANSFER-ENCODING: chunked"),
        ("x", "Transfer-Encoding: x"),
        ("identity", "Transfer-Encoding: identity"),
        ("chunked-identity", "Transfer-Encoding: chunked, identity"),
        ("chunked-param", "Transfer-Encoding: chunked;q=1"),
        ("chunked-param-space", "Transfer-Encoding: chunked ; q=1"),
        ("obs-fold-value", "Transfer-Encoding:\r\n chunked"),
        ("obs-fold-continuation", "Transfer-Encoding: chunked\r\n , identity"),
        ("obs-fold-after-x", "X: y\r\n Transfer-Encoding: chunked"),
        ("chunked-uppercase-value", "Transfer-Encoding: CHUNKED"),
        ("chunked-space-before-value", "Transfer-Encoding:   chunked   "),
        ("chunked-ws-list", "Transfer-Encoding: chunked ,"),
        ("te-and-te-header", "TE: chunked"),
        ("content-transfer-encoding", "Content-Transfer-Encoding: chunked"),
        ("transfer-encodings", "Transfer-Encodings: chunked"),
        ("unicode-k", "Transfer-Encoding: chun\xe2\x84\xaaed"),
        ("nul-in-value", "Transfer-Encoding: chun\x00ked"),
        ("nul-after-value", "Transfer-Encoding: chunked\x00"),
    ]:
        add_te_gadget(c, "ps-tete-" + slugname, "portswigger-tete", src, g)

    # CL.0: the back-end ignores Content-Length on some requests.
    src = SRC_PS_BROWSER
    for method in ["POST", "GET", "HEAD", "OPTIONS", "DELETE", "PUT", "PATCH", "TRACE"]:
        c.add("ps-cl0-%s" % method.lower(), "portswigger-cl0", src,
              head(method, None, ["Content-Length: %d" % len(HIDDEN), "Connection: keep-alive"]) + HIDDEN)
    c.add("ps-cl0-static-path", "portswigger-cl0", src,
          head("POST", "/public/" + NAME + "/static.js",
               ["Content-Length: %d" % len(HIDDEN)]) + HIDDEN)
    c.add("ps-cl0-redirect-path", "portswigger-cl0", src,
          head("POST", "/public/" + NAME + "/..%2f", ["Content-Length: %d" % len(HIDDEN)]) + HIDDEN)
    c.add("ps-cl0-expect", "portswigger-cl0", src,
          head("POST", None, ["Content-Length: %d" % len(HIDDEN), "Expect: 100-continue"]) + HIDDEN)
    # 0.CL: the front-end ignores Content-Length, the back-end honours it.
    for slugname, g in [
        ("space-before-colon", "Content-Length : %d"),
        ("tab-before-colon", "Content-Length\t: %d"),
        ("obs-fold", "Content-Length:\r\n %d"),
        ("vt-value", "Content-Length:\x0b%d"),
        ("ff-value", "Content-Length:\x0c%d"),
        ("expect-obfs", "Content-Length: %d\r\nExpect: y 100-continue"),
        ("lf-name", "Content-Length\n: %d"),
        ("leading-space-name", " Content-Length: %d"),
    ]:
        c.add("ps-0cl-" + slugname, "portswigger-0cl", src,
              head("GET", None, [g % len(HIDDEN)]) + HIDDEN)

    # Request-line tricks (each followed by a pipelined hidden request).
    src = SRC_PS % " / RFC 9112 section 3"
    rl = [
        ("absolute-form", "GET http://h/public/%s HTTP/1.1\r\n" % NAME),
        ("absolute-form-https", "GET https://h/public/%s HTTP/1.1\r\n" % NAME),
        ("absolute-form-other-host", "GET http://evil/public/%s HTTP/1.1\r\n" % NAME),
        ("absolute-form-upper-scheme", "GET HTTP://h/public/%s HTTP/1.1\r\n" % NAME),
        ("absolute-form-userinfo", "GET http://u@h/public/%s HTTP/1.1\r\n" % NAME),
        ("trailing-space", "GET /public/%s HTTP/1.1 \r\n" % NAME),
        ("double-space", "GET  /public/%s HTTP/1.1\r\n" % NAME),
        ("double-space-before-version", "GET /public/%s  HTTP/1.1\r\n" % NAME),
        ("tab-separators", "GET\t/public/%s\tHTTP/1.1\r\n" % NAME),
        ("leading-space", " GET /public/%s HTTP/1.1\r\n" % NAME),
        ("leading-crlf", "\r\nGET /public/%s HTTP/1.1\r\n" % NAME),
        ("leading-lf", "\nGET /public/%s HTTP/1.1\r\n" % NAME),
        ("lowercase-version", "GET /public/%s http/1.1\r\n" % NAME),
        ("http-1-2", "GET /public/%s HTTP/1.2\r\n" % NAME),
        ("http-0-9", "GET /public/%s HTTP/0.9\r\n" % NAME),
        ("http-2-0", "GET /public/%s HTTP/2.0\r\n" % NAME),
        ("http-1-10", "GET /public/%s HTTP/1.10\r\n" % NAME),
        ("http-01-1", "GET /public/%s HTTP/01.1\r\n" % NAME),
        ("http-1-1-suffix", "GET /public/%s HTTP/1.1x\r\n" % NAME),
        ("no-version", "GET /public/%s\r\n" % NAME),
        ("lowercase-method", "get /public/%s HTTP/1.1\r\n" % NAME),
        ("unknown-method", "FOO /public/%s HTTP/1.1\r\n" % NAME),
        ("connect-method", "CONNECT /public/%s HTTP/1.1\r\n" % NAME),
        ("method-with-slash", "GET/ /public/%s HTTP/1.1\r\n" % NAME),
        ("bare-cr-in-line", "GET /public/%s\rHTTP/1.1\r\n" % NAME),
        ("nul-in-target", "GET /public/%s\x00 HTTP/1.1\r\n" % NAME),
        ("space-in-target", "GET /public/%s /x HTTP/1.1\r\n" % NAME),
    ]
    for slugname, reqline in rl:
        c.add("ps-request-line-" + slugname, "request-line", src,
              reqline + "Host: h\r\n\r\n" + HIDDEN)
    # Bare-LF heads.
    c.add("ps-request-line-bare-lf-head", "request-line", src,
          "GET /public/%s HTTP/1.1\nHost: h\n\n" % NAME + HIDDEN)
    c.add("ps-request-line-bare-lf-after-line", "request-line", src,
          "GET /public/%s HTTP/1.1\nHost: h\r\n\r\n" % NAME + HIDDEN)
    c.add("ps-request-line-bare-lf-end", "request-line", src,
          "GET /public/%s HTTP/1.1\r\nHost: h\r\n\n" % NAME + HIDDEN)
    c.add("ps-request-line-bare-lf-head-cl", "request-line", src,
          "POST /public/%s HTTP/1.1\nHost: h\nContent-Length: 3\n\nx=1" % NAME + HIDDEN)
    c.add("ps-request-line-bare-cr-head", "request-line", src,
          "GET /public/%s HTTP/1.1\rHost: h\r\r" % NAME + HIDDEN)
    c.add("ps-request-line-http10-no-host", "request-line", src,
          "GET /public/%s HTTP/1.0\r\n\r\n" % NAME)
    c.add("ps-request-line-http10-keepalive-no-host", "request-line", src,
          "GET /public/%s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % NAME + HIDDEN)
    c.add("ps-request-line-http10-chunked", "request-line", src,
          "POST /public/%s HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % NAME + HIDDEN)
    c.add("ps-request-line-http09-simple", "request-line", src, "GET /public/%s\r\n\r\n" % NAME)

    # Content-Length values.
    src = SRC_PS % " (duplicate / malformed Content-Length); RFC 9112 section 6.3"
    for slugname, f in [
        ("dup-same", "Content-Length: {n}\r\nContent-Length: {n}"),
        ("list-same", "Content-Length: {n}, {n}"),
        ("list-same-nospace", "Content-Length: {n},{n}"),
        ("dup-conflict-first-small", "Content-Length: 3\r\nContent-Length: {n}"),
        ("dup-conflict-first-big", "Content-Length: {n}\r\nContent-Length: 3"),
        ("list-conflict", "Content-Length: {n}, 3"),
        ("list-conflict-rev", "Content-Length: 3, {n}"),
        ("plus", "Content-Length: +{n}"),
        ("hex", "Content-Length: 0x{x}"),
        ("leading-space", "Content-Length:  {n}"),
        ("trailing-space", "Content-Length: {n} "),
        ("leading-tab", "Content-Length:\t{n}"),
        ("trailing-tab", "Content-Length: {n}\t"),
        ("leading-zero", "Content-Length: 0{n}"),
        ("space-inside", "Content-Length: 0 {n}"),
        ("decimal", "Content-Length: {n}.0"),
        ("exponent", "Content-Length: {n}e0"),
        ("trailing-comma", "Content-Length: {n},"),
        ("leading-comma", "Content-Length: ,{n}"),
        ("negative", "Content-Length: -{n}"),
        ("empty-then-real", "Content-Length:\r\nContent-Length: {n}"),
        ("real-then-empty", "Content-Length: {n}\r\nContent-Length:"),
        ("overflow-2-64-plus", "Content-Length: {wrap}"),
        ("huge", "Content-Length: 99999999999999999999"),
        ("nul-suffix", "Content-Length: {n}\x00"),
        ("nbsp-suffix", "Content-Length: {n}\xa0"),
        ("fullwidth-digit", "Content-Length: \xef\xbc\x93"),
        ("underscore", "Content-Length: 1_{n}"),
        ("lower-name", "content-length: {n}"),
        ("content_length-underscore", "Content_Length: {n}"),
    ]:
        def mk(nval, f=f):
            n = int(nval)
            return f.format(n=n, x="%x" % n, wrap=str(2 ** 64 + n))
        long_, short = cl_shapes(mk)
        c.add("ps-cl-%s-long" % slugname, "content-length", src, long_)
        c.add("ps-cl-%s-short" % slugname, "content-length", src, short)

    # Host header tricks.
    src = SRC_PS % "/exploiting (Host header); RFC 9112 section 3.2"
    for slugname, req in [
        ("two-hosts", line("GET") + "Host: h\r\nHost: x\r\n\r\n"),
        ("two-hosts-same", line("GET") + "Host: h\r\nHost: h\r\n\r\n"),
        ("missing", line("GET") + "\r\n"),
        ("obs-fold-host", line("GET") + "Host: h\r\n Host: x\r\n\r\n"),
        ("host-value-folded", line("GET") + "Host:\r\n h\r\n\r\n"),
        ("empty", line("GET") + "Host:\r\n\r\n"),
        ("port", line("GET") + "Host: h:80\r\n\r\n"),
        ("userinfo", line("GET") + "Host: u@h\r\n\r\n"),
        ("space-before-colon", line("GET") + "Host : h\r\n\r\n"),
        ("tab-value", line("GET") + "Host:\th\r\n\r\n"),
        ("list", line("GET") + "Host: h, x\r\n\r\n"),
        ("lower-and-upper", line("GET") + "host: h\r\nHOST: x\r\n\r\n"),
        ("absolute-form-mismatch", "GET http://x/public/%s HTTP/1.1\r\nHost: h\r\n\r\n" % NAME),
        ("x-forwarded-host", line("GET") + "Host: h\r\nX-Forwarded-Host: evil\r\n\r\n"),
        ("host-nul", line("GET") + "Host: h\x00.evil\r\n\r\n"),
        ("host-high-bytes", line("GET") + "Host: \xffh\xff\r\n\r\n"),
        ("host-path", line("GET") + "Host: h/admin/smuggled\r\n\r\n"),
    ]:
        c.add("ps-host-" + slugname, "host", src, req + HIDDEN)

    # Header-name whitespace.
    src = SRC_GARDEN % " #3/#4 (whitespace around header names)"
    for slugname, g in [
        ("cl-space-colon", "Content-Length : 5"),
        ("cl-tab-colon", "Content-Length\t: 5"),
        ("cl-vt-colon", "Content-Length\x0b: 5"),
        ("cl-leading-space-first", " Content-Length: 5"),
        ("cl-leading-tab-first", "\tContent-Length: 5"),
        ("cl-vt-value", "Content-Length:\x0b5"),
        ("cl-ff-value", "Content-Length:\x0c5"),
        ("te-space-colon", "Transfer-Encoding : chunked"),
    ]:
        c.add("ps-header-name-ws-" + slugname, "header-name-ws", src,
              line("POST") + g + "\r\nHost: h\r\n\r\n" + "x=1ab" + HIDDEN)
    c.add("ps-header-name-ws-cl-space-colon-after-host", "header-name-ws", src,
          head("POST", None, ["Content-Length : %d" % len(HIDDEN)]) + HIDDEN)


# ------------------------------------------------------------ http-garden

def garden(c):
    te = "Transfer-Encoding: chunked"
    fam = "http-garden-chunked"
    src = SRC_GARDEN % " (chunked-body discrepancies)"
    bodies = [
        # chunk-size prefixes and forms
        ("size-0x", "0x5\r\nhello\r\n0\r\n\r\n"),
        ("size-0X", "0X5\r\nhello\r\n0\r\n\r\n"),
        ("size-plus", "+5\r\nhello\r\n0\r\n\r\n"),
        ("size-minus", "-5\r\nhello\r\n0\r\n\r\n"),
        ("size-leading-space", " 5\r\nhello\r\n0\r\n\r\n"),
        ("size-leading-tab", "\t5\r\nhello\r\n0\r\n\r\n"),
        ("size-trailing-space", "5 \r\nhello\r\n0\r\n\r\n"),
        ("size-trailing-tab", "5\t\r\nhello\r\n0\r\n\r\n"),
        ("size-leading-zero", "05\r\nhello\r\n0\r\n\r\n"),
        ("size-20-digits", "00000000000000000005\r\nhello\r\n0\r\n\r\n"),
        ("size-24-digits", "000000000000000000000005\r\nhello\r\n0\r\n\r\n"),
        ("size-underscore", "0_5\r\nhello\r\n0\r\n\r\n"),
        ("size-underscore-2e", "0_2e\r\n\r\n"),
        ("size-2-64-plus-5", "10000000000000005\r\nhello\r\n0\r\n\r\n"),
        ("size-f17-5", "fffffffffffffffff5\r\nhello\r\n0\r\n\r\n"),
        ("size-2-63", "8000000000000000\r\nhello\r\n0\r\n\r\n"),
        ("size-16-f", "ffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("size-15-f", "fffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("size-upper-hex", "A\r\n0123456789\r\n0\r\n\r\n"),
        ("last-minus-0", "-0\r\n\r\n"),
        ("last-plus-0", "+0\r\n\r\n"),
        ("last-0x0", "0x0\r\n\r\n"),
        ("last-00", "00\r\n\r\n"),
        ("last-space-0", " 0\r\n\r\n"),
        ("last-0-space", "0 \r\n\r\n"),
        ("empty-size-line", "\r\n5\r\nhello\r\n0\r\n\r\n"),
        ("empty-size-lines-only", "\r\n\r\n"),
        ("invalid-size-words", "INVALID!!!\r\n"),
        ("invalid-sizes-z", "Z\r\nZZ\r\nZZZ\r\n\r\n"),
        ("size-with-junk-suffix", "1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n"),
        ("size-cr-zero-lf", "1\r0\n"),
        # extensions
        ("ext-token", "5;a=b\r\nhello\r\n0\r\n\r\n"),
        ("ext-quoted", "5;a=\"b\"\r\nhello\r\n0\r\n\r\n"),
        ("ext-quoted-crlf", "5;a=\"b\r\nc\"\r\nhello\r\n0\r\n\r\n"),
        ("ext-quoted-escaped-quote", "5;a=\"\\\"\"\r\nhello\r\n0\r\n\r\n"),
        ("ext-unterminated-quote", "5;a=\"b\r\nhello\r\n0\r\n\r\n"),
        ("ext-bare-lf", "5;\nhello\r\n0\r\n\r\n"),
        ("ext-name-bare-lf", "5;a\nhello\r\n0\r\n\r\n"),
        ("ext-bare-cr", "5;a\rhello\r\n0\r\n\r\n"),
        ("ext-bare-cr-x", "5;a\rX\r\nhello\r\n0\r\n\r\n"),
        ("ext-space-before-semicolon", "5 ;a\r\nhello\r\n0\r\n\r\n"),
        ("ext-space-after-semicolon", "5; a\r\nhello\r\n0\r\n\r\n"),
        ("ext-space-around-equals", "5;a = b\r\nhello\r\n0\r\n\r\n"),
        ("ext-empty-name", "5;=b\r\nhello\r\n0\r\n\r\n"),
        ("ext-double-semicolon", "5;;\r\nhello\r\n0\r\n\r\n"),
        ("ext-nul", "5;\x00\r\nhello\r\n0\r\n\r\n"),
        ("ext-value-nul", "5;a=\x00\r\nhello\r\n0\r\n\r\n"),
        ("ext-del", "5;\x7f\r\nhello\r\n0\r\n\r\n"),
        ("ext-high-byte", "5;\xff\r\nhello\r\n0\r\n\r\n"),
        ("ext-on-last-chunk", "0;a=b\r\n\r\n"),
        ("ext-cr-cr", "5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\n"),
        ("ext-semicolon-cr-cr", "41;a=b\r\r" + "X" * 65 + "\r\n0\r\n\r\n"),
        ("ext-cr-before-semicolon", "2\r\r;a\r\n02\r\n41\r\n0\r\n\r\n"),
        # line terminators
        ("all-bare-lf", "5\nhello\n0\n\n"),
        ("all-bare-cr", "5\rhello\r0\r\r"),
        ("size-cr-cr-lf", "5\r\r\nhello\r\n0\r\n\r\n"),
        ("data-bare-lf", "5\r\nhello\n0\r\n\r\n"),
        ("data-bare-cr", "5\r\nhello\r0\r\n\r\n"),
        ("data-lf-cr", "5\r\nhello\n\r0\r\n\r\n"),
        ("data-xx-instead-of-crlf", "5\r\nhelloXX0\r\n\r\n"),
        ("data-short", "5\r\nhell\r\n0\r\n\r\n"),
        ("data-long", "5\r\nhelloo\r\n0\r\n\r\n"),
        ("last-chunk-lf-crlf", "0\n\r\n"),
        ("last-chunk-lf-lf", "0\n\n"),
        ("last-chunk-crlf-lf", "0\r\n\n"),
        ("last-chunk-crlf-cr", "0\r\n\r"),
        ("last-chunk-crlf-cr-x", "0\r\n\rX"),
        ("last-chunk-crlf-crcr-lf", "0\r\n\r\r\n"),
        ("last-chunk-crlf-lf-cr", "0\r\n\n\r"),
        ("lone-lf-after-last-chunk", "0\r\n\r\n\n"),
        # trailers
        ("trailer-content-length", "0\r\nContent-Length: 50\r\n\r\n"),
        ("trailer-transfer-encoding", "0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("trailer-transfer-encoding-identity", "0\r\nTransfer-Encoding: identity\r\n\r\n"),
        ("trailer-host", "0\r\nHost: evil\r\n\r\n"),
        ("trailer-x-auth", "0\r\nX-Auth-Subject: admin\r\n\r\n"),
        ("trailer-x-auth-lower", "0\r\nx-auth-subject: admin\r\n\r\n"),
        ("trailer-x-auth-tier", "0\r\nX-Auth-Tier: enterprise\r\n\r\n"),
        ("trailer-x-forwarded-for", "0\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"),
        ("trailer-x-request-id", "0\r\nX-Request-Id: smuggled\r\n\r\n"),
        ("trailer-authorization", "0\r\nAuthorization: Bearer x\r\n\r\n"),
        ("trailer-underscore", "0\r\nX_Auth_Subject: admin\r\n\r\n"),
        ("trailer-bare-cr-value", "0\r\nX: a\rb\r\n\r\n"),
        ("trailer-nul-value", "0\r\nX: a\x00b\r\n\r\n"),
        ("trailer-bare-lf-end", "0\r\nX: y\n\n"),
        ("trailer-obs-fold", "0\r\nX: a\r\n folded\r\n\r\n"),
        ("trailer-leading-space", "0\r\n X: folded\r\n\r\n"),
        ("trailer-empty-name", "0\r\n: empty\r\n\r\n"),
        ("trailer-no-colon", "0\r\nNoColon\r\n\r\n"),
        ("trailer-space-before-colon", "0\r\nX : y\r\n\r\n"),
        ("trailer-request-line", "0\r\nGET /admin/smuggled HTTP/1.1\r\n\r\n"),
        ("trailer-x-post", "0\r\nX:POST / HTTP/1.1\r\n\r\n"),
        ("trailer-high-bytes", "0\r\nX: \xff\xfe\r\n\r\n"),
        ("trailer-many-lines", "0\r\n" + "X: y\r\n" * 300 + "\r\n"),
    ]
    for slugname, body in bodies:
        c.add("garden-chunked-" + slugname, fam, src, head("POST", None, [te]) + body + HIDDEN)

    fam = "http-garden-headers"
    src = SRC_GARDEN % " (header and request-line discrepancies)"
    reqs = [
        ("value-nul-cr", head("GET", None, ["Header: v\x00\ralue"])),
        ("value-nul-truncation", head("GET", None, ["Test: test\x00THESE BYTES GET DROPPED"])),
        ("value-bare-cr", head("GET", None, ["Header: va\rlue"])),
        ("value-bare-cr-many", head("GET", None, ["Invalid-Header: this\rvalue\ris\rinvalid"])),
        ("value-trailing-nul", head("GET", None, ["Evil: evil\x00"])),
        ("host-nul", line("GET") + "Host: h\x00.evil\r\n\r\n"),
        ("name-cr-smuggled-header", head("GET", None, ["Visible: :/\rX-Auth-Subject: admin"])),
        ("value-cr-smuggled-header", head("GET", None, ["Visible: x\rX-Auth-Subject: admin"])),
        ("value-lf-smuggled-header", head("GET", None, ["Visible: x\nX-Auth-Subject: admin"])),
        ("name-nel-cl", line("POST") + "Host: h\r\nContent-Length\x85: 10\r\n\r\n0123456789"),
        ("name-nel", head("GET", None, ["Header\x85: value"])),
        ("name-high-byte-first", line("GET") + "\xefoo: bar\r\nHost: h\r\n\r\n"),
        ("value-nel-nbsp", head("GET", None, ["User: \x85admin\xa0"])),
        ("te-nbsp-wrapped", head("POST", None, ["Transfer-Encoding: \xa0chunked\xa0"]) + "0\r\n\r\n"),
        ("te-ff-wrapped", line("POST") + "Host: \xffa\xff\r\nTransfer-Encoding: \xffchunked\xff\r\n\r\n1\r\nZ\r\n0\r\n\r\n"),
        ("empty-name", line("GET") + ": ignored\r\nHost: h\r\n\r\n"),
        ("colon-only-line", line("GET") + "Host: h\r\n:\r\nI: am chopped off\r\n\r\n"),
        ("cl-no-colon", head("POST", None, ["Content-Length 10"]) + "0123456789"),
        ("cl-1z", head("POST", None, ["Content-Length: 1Z"]) + "Z"),
        ("cl-010", head("POST", None, ["Content-Length: 010"]) + "01234567"),
        ("cl-plus-underscore", head("POST", None, ["Content-Length: +1_0"]) + "0123456789"),
        ("cl-negative", head("POST", None, ["Content-Length: -48"])),
        ("cl-empty", head("GET", None, ["Content-Length: "])),
        ("cl-empty-then-real", head("GET", None, ["Content-Length: ", "Content-Length: %d" % len(HIDDEN)])),
        ("cl-0x10", head("POST", None, ["Content-Length: 0x10"]) + "Z"),
        ("cl-conflict-1-0", head("GET", None, ["Content-Length: 1", "Content-Length: 0"]) + "Z"),
        ("cl-conflict-0-1", head("GET", None, ["Content-Length: 0", "Content-Length: 1"]) + "Z"),
        ("name-continued", line("POST") + "Host: h\r\nTransfer-\r\nEncoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
        ("head-end-cr-x", line("GET") + "Host: h\r\n\rZGET /admin/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"),
        ("useless-lf-lf", line("GET") + "Host: h\r\nUseless:\n\n"),
        ("te-unknown-blegh", head("POST", None, ["Transfer-Encoding: blegh"]) + "1\r\nZ\r\n0\r\n\r\n"),
        ("te-two-chunked", head("POST", None, ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"]) + "1\r\nZ\r\n0\r\n\r\n"),
        ("te-comma-chunked-cl", head("GET", None, ["Transfer-Encoding: ,chunked", "Content-Length: 5"]) + "0\r\n\r\n"),
        ("te-comma-chunked", head("POST", None, ["Transfer-Encoding: ,chunked"]) + "0\r\n\r\n"),
        ("connection-close-then-junk", head("GET", None, ["Connection: close"]) + "Invalid\r\n\r\n"),
        ("pipelined-cl0-keepalive", head("POST", None, ["Content-Length: 0", "Connection:keep-alive", "id: 0"])
         + "POST /admin/smuggled HTTP/1.1\r\n" + SMUG_HEADERS + "Content-Length: 34\r\n\r\n"),
        ("version-1-32", line("GET", None, "HTTP/1.32") + "Host: h\r\n\r\n"),
        ("version-huge", line("GET", None, "HTTP/4294967295.255") + "Host: h\r\n\r\n"),
        ("version-lf-separator", "GET /public/%s\nHTTP/1.1\r\nHost: h\r\n\r\n" % NAME),
        ("version-cr-cr", "GET /public/%s HTTP/\r\r1.1\r\nHost: h\r\n\r\n" % NAME),
        ("method-nul", "\x00 /public/%s HTTP/1.1\r\nHost: h\r\n\r\n" % NAME),
        ("method-punctuation", "G=\":<>(e),[T];?\" /public/%s HTTP/1.1\r\nHost: h\r\n\r\n" % NAME),
        ("target-bang", "GET ! HTTP/1.1\r\nHost: h\r\nX-Corpus: %s\r\n\r\n" % NAME),
        ("double-space-after-target", "POST /public/%s  HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r0\n" % NAME),
        ("empty-cl-first-then-cl", line("GET") + "host: h\r\ncontent-length: \r\ncontent-length: %d\r\n\r\n"
         % len(hidden_post("")) + hidden_post("")),
    ]
    for slugname, req in reqs:
        c.add("garden-" + slugname, fam, src, req + HIDDEN)


# ------------------------------------------------------------ funky chunks

def funky(c):
    te = "Transfer-Encoding: chunked"
    fam = "funky-chunks"
    # The hidden request as chunk data of a known size, and the same as a
    # request line that a parser reading one byte further would see.
    S = HIDDEN
    n = len(S)
    cases = [
        # TERM.EXT: front-end ends the size line at the LF, back-end treats
        # the LF as part of the extension and reads on to the CRLF.
        ("term-ext-lf", "2;\nxx\r\n%x\r\n%s\r\n0\r\n\r\n" % (n, S)),
        ("term-ext-lf-name", "2;a\nxx\r\n%x\r\n%s\r\n0\r\n\r\n" % (n, S)),
        ("term-ext-lf-value", "2;a=b\nxx\r\n%x\r\n%s\r\n0\r\n\r\n" % (n, S)),
        ("term-ext-1-lf", "1;\nx\r\n0\r\n\r\n"),
        ("term-ext-lf-then-hidden", "1;\n" + "x\r\n0\r\n\r\n" + S),
        # EXT.TERM: the reverse; a bare CR/LF inside the extension.
        ("ext-term-cr", "1;a\rX\r\nx\r\n0\r\n\r\n"),
        ("ext-term-cr-lf-split", "1;a\r\rX\r\nx\r\n0\r\n\r\n"),
        ("ext-term-lf-then-size", "%x;\n0\r\n\r\n%s\r\n0\r\n\r\n" % (n + 7, S)),
        ("ext-term-quoted-lf", "1;a=\"\n\"\r\nx\r\n0\r\n\r\n"),
        # TERM.SPILL / SPILL.TERM: what follows chunk data, one byte off.
        ("term-spill-lf", "2\r\nxx\n%x\r\n%s\r\n0\r\n\r\n" % (n, S)),
        ("term-spill-lf-short", "2\r\nxx\n0\r\n\r\n"),
        ("spill-term-extra-byte", "2\r\nxxx\r\n0\r\n\r\n"),
        ("spill-term-two-extra", "2\r\nxxyy\r\n0\r\n\r\n"),
        ("spill-term-cr-x", "2\r\nxx\rX0\r\n\r\n"),
        ("spill-term-x-lf", "2\r\nxxX\n0\r\n\r\n"),
        ("one-byte-short", "2\r\nx\r\n0\r\n\r\n"),
        ("one-byte-long", "3\r\nxx\r\n0\r\n\r\n"),
        ("one-byte-long-eats-cr", "3\r\nxx\r\n\n0\r\n\r\n"),
        ("one-byte-short-hidden", "%x\r\n%s\r\n0\r\n\r\n" % (n - 1, S)),
        ("one-byte-long-hidden", "%x\r\n%s\r\n0\r\n\r\n" % (n + 1, S)),
        ("two-byte-long-swallows-crlf", "%x\r\n%s\r\n0\r\n\r\n" % (n + 2, S)),
        ("data-lf-terminated", "2\r\nxx\n0\r\n\r\n"),
        ("data-crlf-then-lf-last", "2\r\nxx\r\n0\n\n"),
        ("size-lf", "2\nxx\r\n0\r\n\r\n"),
        ("size-cr", "2\rxx\r\n0\r\n\r\n"),
        ("size-lf-hidden", "%x\n%s\r\n0\r\n\r\n" % (n, S)),
    ]
    # Systematic: every line terminator at every place of the size line.
    terms = [("lf", "\n"), ("cr", "\r"), ("cr-x", "\rX"), ("cr-cr-lf", "\r\r\n"),
             ("lf-cr", "\n\r"), ("nul-crlf", "\x00\r\n"), ("sp-lf", " \n"), ("tab-lf", "\t\n")]
    spots = [("size", "2"), ("semi", "2;"), ("name", "2;a"), ("value", "2;a=b"),
             ("quoted", "2;a=\"b\""), ("open-quote", "2;a=\"b"), ("space-semi", "2 ;a")]
    for sname, start in spots:
        for tname, term in terms:
            cases.append(("grid-%s-%s" % (sname, tname), start + term + "xx\r\n0\r\n\r\n"))
    # ...and after chunk data and after the last chunk.
    for tname, term in terms:
        cases.append(("grid-after-data-%s" % tname, "2\r\nxx" + term + "0\r\n\r\n"))
        cases.append(("grid-after-last-%s" % tname, "0\r\n" + term))
        cases.append(("grid-last-line-%s" % tname, "0" + term + "\r\n"))
    src = SRC_FUNKY % ""
    for slugname, body in cases:
        c.add("funky-" + slugname, fam, src, head("POST", None, [te]) + body + HIDDEN)


# ---------------------------------------------------------------- upgrade

def upgrade(c):
    fam = "upgrade"
    src = "https://github.com/BishopFox/h2csmuggler; https://portswigger.net/research/http2 (h2c); RFC 9110 section 7.8"
    settings = "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"
    preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    frames = "\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    for slugname, hdrs, tail in [
        ("h2c-no-connection", ["Upgrade: h2c", settings], preface),
        ("h2c-connection-upgrade-only", ["Upgrade: h2c", settings, "Connection: Upgrade"], preface),
        ("h2c-connection-settings-only", ["Upgrade: h2c", settings, "Connection: HTTP2-Settings"], preface),
        ("h2c-post-chunked", ["Upgrade: h2c", settings, "Connection: Upgrade, HTTP2-Settings",
                              "Transfer-Encoding: chunked"], "0\r\n\r\n" + preface),
        ("h2c-close", ["Upgrade: h2c", settings, "Connection: close, Upgrade, HTTP2-Settings"], preface),
        ("h2c-two-upgrade-headers", ["Upgrade: h2c", "Upgrade: websocket", "Connection: Upgrade"], preface),
        ("h2c-upgrade-list", ["Upgrade: websocket, h2c", settings, "Connection: Upgrade, HTTP2-Settings"], preface),
        ("websocket", ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="], HIDDEN),
        ("websocket-bad-version", ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 1337",
                                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="], HIDDEN),
        ("websocket-no-key", ["Upgrade: websocket", "Connection: Upgrade"], HIDDEN),
        ("upgrade-empty", ["Upgrade:", "Connection: Upgrade"], HIDDEN),
        ("upgrade-tls", ["Upgrade: TLS/1.2", "Connection: Upgrade"], HIDDEN),
        ("upgrade-http11", ["Upgrade: HTTP/1.1", "Connection: Upgrade"], HIDDEN),
        ("upgrade-no-connection-token", ["Upgrade: websocket", "Connection: keep-alive"], HIDDEN),
    ]:
        c.add("upgrade-" + slugname, fam, src, head("GET", None, hdrs) + tail)
    c.add("upgrade-h2c-frames", fam, src,
          head("GET", None, ["Upgrade: h2c", settings, "Connection: Upgrade, HTTP2-Settings"]) + preface + frames)
    c.add("upgrade-prior-knowledge-preface", fam, src, preface + frames)
    c.add("upgrade-connect-authority", fam, src,
          "CONNECT h:80 HTTP/1.1\r\nHost: h\r\nX-Corpus: %s\r\n\r\n" % NAME + HIDDEN)
    c.add("upgrade-connect-path", fam, src,
          "CONNECT /public/%s HTTP/1.1\r\nHost: h\r\n\r\n" % NAME + HIDDEN)

    fam = "hop-by-hop"
    src = "https://nathandavison.com/blog/abusing-http-hop-by-hop-request-headers; RFC 9110 section 7.6.1"
    for slugname, token in [
        ("x-request-id", "X-Request-Id"), ("x-forwarded-for", "X-Forwarded-For"),
        ("x-forwarded-proto", "X-Forwarded-Proto"), ("x-auth-subject", "X-Auth-Subject"),
        ("x-auth-tier", "X-Auth-Tier"), ("host", "Host"), ("content-length", "Content-Length"),
        ("transfer-encoding", "Transfer-Encoding"), ("authorization", "Authorization"),
        ("x-api-key", "X-API-Key"), ("cookie", "Cookie"), ("many", "X-Request-Id, X-Forwarded-For, X-Auth-Subject"),
        ("close-and-x-request-id", "close, X-Request-Id"),
        ("keep-alive-and-x-forwarded-for", "keep-alive, X-Forwarded-For"),
    ]:
        c.add("hop-" + slugname, fam, src, head("GET", None, ["Connection: " + token]) + HIDDEN)
    c.add("hop-content-length-with-body", fam, src,
          head("POST", None, ["Connection: Content-Length", "Content-Length: %d" % len(HIDDEN)]) + HIDDEN)
    c.add("hop-transfer-encoding-with-body", fam, src,
          head("POST", None, ["Connection: Transfer-Encoding", "Transfer-Encoding: chunked"]) + "0\r\n\r\n" + HIDDEN)
    c.add("hop-keep-alive-header", fam, src, head("GET", None, ["Keep-Alive: timeout=5", "Connection: Keep-Alive"]) + HIDDEN)
    c.add("hop-proxy-connection", fam, src, head("GET", None, ["Proxy-Connection: X-Request-Id"]) + HIDDEN)
    c.add("hop-te-trailers", fam, src, head("GET", None, ["TE: trailers", "Connection: TE"]) + HIDDEN)
    c.add("hop-trailer-header", fam, src, head("GET", None, ["Trailer: X-Auth-Subject"]) + HIDDEN)


# -------------------------------------------------------------- underscore

def underscore(c):
    fam = "underscore"
    src = ("https://www.nginx.com/resources/wiki/start/topics/tutorials/config_pitfalls/#missing-disappearing-http-headers "
           "(underscores_in_headers); CGI/WSGI HTTP_X_AUTH_SUBJECT collisions")
    spoofs = [
        ("x-auth-subject", "X_Auth_Subject: admin"),
        ("x-auth-subject-lower", "x_auth_subject: admin"),
        ("x-auth-subject-mixed-1", "X-Auth_Subject: admin"),
        ("x-auth-subject-mixed-2", "X_Auth-Subject: admin"),
        ("x-auth-tier", "X_Auth_Tier: enterprise"),
        ("x-auth-permissions", "X_Auth_Permissions: *"),
        ("x-auth-method", "X_Auth_Method: jwt"),
        ("x-auth-email", "X_Auth_Email: admin@example.com"),
        ("x-auth-key-id", "X_Auth_Key_Id: root"),
        ("x-forwarded-for", "X_Forwarded_For: 1.2.3.4"),
        ("x-forwarded-for-mixed", "X-Forwarded_For: 1.2.3.4"),
        ("x-forwarded-proto", "X_Forwarded_Proto: https"),
        ("x-forwarded-host", "X_Forwarded_Host: evil"),
        ("x-real-ip", "X_Real_IP: 1.2.3.4"),
        ("x-request-id", "X_Request_Id: v"),
        ("x-api-key", "X_API_Key: " + PROBE_KEY),
        ("content-length", "Content_Length: 0"),
        ("plain", "X_Custom: 1"),
        ("hyphen-auth-subject", "X-Auth-Subject: admin"),
        ("hyphen-auth-subject-lower", "x-auth-subject: admin"),
        ("hyphen-auth-subject-upper", "X-AUTH-SUBJECT: admin"),
        ("hyphen-auth-subject-tab", "X-Auth-Subject:\tadmin"),
        ("hyphen-auth-subject-space-colon", "X-Auth-Subject : admin"),
        ("hyphen-auth-subject-obs-fold", "X-Foo: bar\r\n X-Auth-Subject: admin"),
        ("hyphen-auth-subject-value-fold", "X-Auth-Subject:\r\n admin"),
        ("hyphen-auth-dot", "X.Auth.Subject: admin"),
        ("hyphen-auth-nbsp", "X-Auth-Subject\xa0: admin"),
        ("hyphen-auth-shy", "X-Auth\xadSubject: admin"),
        ("hyphen-auth-prefix-only", "X-Auth-: admin"),
        ("two-x-request-ids", "X-Request-Id: a\r\nX-Request-Id: b"),
        ("x-request-id-long", "X-Request-Id: " + "r" * 200),
        ("x-request-id-space", "X-Request-Id: a b"),
        ("x-request-id-empty", "X-Request-Id:"),
        ("x-request-id-high", "X-Request-Id: \xe9"),
    ]
    for slugname, hdr in spoofs:
        c.add("underscore-public-" + slugname, fam, src, head("GET", None, [hdr]))
    # The authenticated route with the probe key: keygate's own X-Auth-* set
    # must be exactly what arrives.
    for slugname, hdr in spoofs:
        c.add("underscore-private-" + slugname, "authenticated", src,
              head("GET", "/private/" + NAME, ["X-API-Key: " + PROBE_KEY, hdr]))
    c.add("authenticated-plain", "authenticated", "keygate route semantics",
          head("GET", "/private/" + NAME, ["X-API-Key: " + PROBE_KEY]))
    c.add("authenticated-bearer", "authenticated", "keygate route semantics",
          head("GET", "/private/" + NAME, ["Authorization: Bearer " + PROBE_KEY]))
    c.add("authenticated-no-credentials", "authenticated", "keygate route semantics",
          head("GET", "/private/" + NAME, []))
    c.add("authenticated-two-keys", "authenticated", "keygate route semantics",
          head("GET", "/private/" + NAME, ["X-API-Key: " + PROBE_KEY, "X-API-Key: vmc_other_0123456789"]))
    c.add("authenticated-clte-hidden", "authenticated", SRC_PS % "/finding (CL.TE)",
          head("POST", "/private/" + NAME, ["X-API-Key: " + PROBE_KEY, "Transfer-Encoding: chunked"])
          + "0\r\n\n" + HIDDEN)
    c.add("authenticated-trailer-x-auth", "authenticated", SRC_LEAD % " #8",
          head("POST", "/private/" + NAME, ["X-API-Key: " + PROBE_KEY, "Transfer-Encoding: chunked"])
          + "3\r\nabc\r\n0\r\nX-Auth-Subject: admin\r\n\r\n")


# ----------------------------------------------------------------- targets

def targets(c):
    fam = "target"
    src = ("https://portswigger.net/research/top-10-web-hacking-techniques-of-2018 (Orange Tsai, "
           "'Breaking Parser Logic'); RFC 3986 section 6; RFC 9112 section 3.2")
    tlist = [
        ("admin", "/admin"),
        ("admin-x", "/admin/x"),
        ("admin-slash", "/admin/"),
        ("admin-hash", "/admin#"),
        ("admin-hash-frag", "/admin#frag"),
        ("admin-x-hash", "/admin/x#y"),
        ("admin-pct23", "/admin%23"),
        ("admin-pct2523", "/admin%2523"),
        ("admin-query", "/admin?x=1"),
        ("admin-query-empty", "/admin?"),
        ("admin-pct3f", "/admin%3f"),
        ("dotdot", "/public/../admin/x"),
        ("dotdot-bare", "/public/../admin"),
        ("dotdot-pct", "/public/%2e%2e/admin/x"),
        ("dotdot-pct-upper", "/public/%2E%2E/admin/x"),
        ("dotdot-pct-slash", "/public/..%2fadmin/x"),
        ("dotdot-pct-slash-upper", "/public/..%2Fadmin"),
        ("dotdot-double-pct", "/public/%252e%252e/admin/x"),
        ("dotdot-semicolon", "/public/..;/admin/x"),
        ("dotdot-backslash", "/public\\..\\admin\\x"),
        ("dotdot-mixed-backslash", "/public/..\\admin/x"),
        ("dotdot-pct5c", "/public/..%5cadmin/x"),
        ("dot", "/./admin/x"),
        ("dot-pct", "/%2e/admin/x"),
        ("pct-a", "/%61dmin/x"),
        ("pct-a-upper", "/%41dmin/x"),
        ("pct-all", "/%61%64%6d%69%6e/x"),
        ("double-pct-a", "/%2561dmin/x"),
        ("overlong-utf8-a", "/%c1%a1dmin/x"),
        ("double-slash", "//admin/x"),
        ("triple-slash", "///admin"),
        ("slash-dot-slash", "/admin/./x"),
        ("semicolon", "/admin;/x"),
        ("semicolon-param", "/admin;x=1"),
        ("semicolon-segment", "/admin/;/x"),
        ("semicolon-jsessionid", "/admin;jsessionid=1/x"),
        ("upper", "/ADMIN/x"),
        ("capital", "/Admin"),
        ("pct-nul", "/admin%00/x"),
        ("pct-space", "/admin%20"),
        ("trailing-dot", "/admin./x"),
        ("trailing-space-pct", "/admin%20/x"),
        ("tab-pct", "/admin%09"),
        ("backslash", "/admin\\x"),
        ("backslash-lead", "\\admin\\x"),
        ("utf8-raw", "/\xc3\xa4dmin"),
        ("utf8-raw-public", "/public/\xc3\xa4"),
        ("utf8-overlong-raw", "/admin\xc0\xaf"),
        ("high-byte-invalid-utf8", "/admin/\xff"),
        ("absolute", "http://h/admin/x"),
        ("absolute-bare", "http://h/admin"),
        ("absolute-upper-scheme", "HTTP://h/admin/x"),
        ("absolute-https", "https://h/admin/x"),
        ("absolute-port", "http://h:80/admin"),
        ("absolute-dotdot", "http://h/public/../admin"),
        ("absolute-userinfo", "http://h@x/admin"),
        ("absolute-no-path", "http://h"),
        ("absolute-query-admin", "http://h?/admin"),
        ("absolute-hash-admin", "http://h#/admin"),
        ("absolute-double-slash", "http://h//admin"),
        ("scheme-relative", "//h/admin/x"),
        ("asterisk", "*"),
        ("authority-form", "h:80"),
        ("relative", "admin/x"),
        ("relative-dot", "./admin"),
        ("empty-segment-dot", "/public/x/../../admin"),
        ("encoded-slash", "/admin%2fx"),
        ("encoded-slash-prefix", "%2fadmin"),
        ("fullwidth-slash", "/admin\xef\xbc\x8fx"),
    ]
    for slugname, target in tlist:
        name = "target-" + slugname
        c.add(name, fam, src, "GET %s HTTP/1.1\r\nHost: h\r\nX-Corpus: %s\r\n\r\n" % (target, NAME))
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE", "FOO"]:
        c.add("target-method-%s-admin-hash" % method.lower(), fam, src,
              "%s /admin# HTTP/1.1\r\nHost: h\r\nX-Corpus: %s\r\nContent-Length: 0\r\n\r\n" % (method, NAME))
    c.add("target-options-asterisk", fam, src, "OPTIONS * HTTP/1.1\r\nHost: h\r\nX-Corpus: %s\r\n\r\n" % NAME)


# ---------------------------------------------------------------- pipeline

def pipeline(c):
    fam = "pipeline"
    src = "https://portswigger.net/research/http1-must-die (response queue poisoning); RFC 9112 section 9.3.2"
    pub = "/public/" + NAME
    c.add("pipeline-delay-first", fam, src,
          "GET %s/1 HTTP/1.1\r\nHost: h\r\nX-Test-Delay-Ms: 400\r\n\r\nGET %s/2 HTTP/1.1\r\nHost: h\r\n\r\n" % (pub, pub))
    c.add("pipeline-three", fam, src,
          "".join("GET %s/%d HTTP/1.1\r\nHost: h\r\nX-Test-Delay-Ms: %d\r\n\r\n" % (pub, i, 300 - 100 * i)
                  for i in range(3)))
    c.add("pipeline-post-then-get", fam, src,
          "POST %s/1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX-Test-Delay-Ms: 200\r\n\r\nx=1"
          "GET %s/2 HTTP/1.1\r\nHost: h\r\n\r\n" % (pub, pub))
    c.add("pipeline-chunked-then-get", fam, src,
          "POST %s/1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nx=1\r\n0\r\n\r\n"
          "GET %s/2 HTTP/1.1\r\nHost: h\r\n\r\n" % (pub, pub))
    c.add("pipeline-head-then-get", fam, src,
          "HEAD %s/1 HTTP/1.1\r\nHost: h\r\n\r\nGET %s/2 HTTP/1.1\r\nHost: h\r\n\r\n" % (pub, pub))
    c.add("pipeline-visible-delayed-then-hidden", fam, src,
          "GET %s HTTP/1.1\r\nHost: h\r\nX-Test-Delay-Ms: 300\r\n\r\n" % pub + HIDDEN)
    c.add("pipeline-hidden-first", fam, src,
          HIDDEN + "GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % pub)
    c.add("pipeline-expect-continue", fam, src,
          "POST %s HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nx=1" % pub + HIDDEN)
    c.add("pipeline-expect-continue-no-body-yet", fam, src,
          "POST %s HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (pub, len(HIDDEN)) + HIDDEN)
    c.add("pipeline-http10-keepalive", fam, src,
          "GET %s/1 HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\nGET %s/2 HTTP/1.1\r\nHost: h\r\n\r\n" % (pub, pub))
    c.add("pipeline-connection-close-then-hidden", fam, src,
          "GET %s HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % pub + HIDDEN)
    c.add("pipeline-many", fam, src,
          "".join("GET %s/%d HTTP/1.1\r\nHost: h\r\n\r\n" % (pub, i) for i in range(20)))
    c.add("pipeline-cl-body-looks-like-request", fam, src,
          "POST %s HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (pub, len(HIDDEN)) + HIDDEN
          + "GET %s/2 HTTP/1.1\r\nHost: h\r\n\r\n" % pub)
    c.add("pipeline-chunked-body-looks-like-request", fam, src,
          "POST %s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
          % (pub, len(HIDDEN), HIDDEN) + "GET %s/2 HTTP/1.1\r\nHost: h\r\n\r\n" % pub)


# -------------------------------------------------------------------- main

def build():
    c = Corpus()
    findings(c)  # first, so that the named findings keep their names
    smuggler(c)
    burp_te(c)
    burp_cl(c)
    portswigger(c)
    garden(c)
    funky(c)
    upgrade(c)
    underscore(c)
    targets(c)
    pipeline(c)
    return c


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description="Write the smuggling corpus (JSON lines).")
    ap.add_argument("--out", default=os.path.join(here, "smuggling.jsonl"))
    args = ap.parse_args()
    c = build()
    with open(args.out, "w", encoding="ascii", newline="\n") as f:
        for e in c.entries:
            f.write(json.dumps(e, ensure_ascii=True) + "\n")
    fams = {}
    for e in c.entries:
        fams[e["family"]] = fams.get(e["family"], 0) + 1
    sys.stderr.write("%d payloads (%d duplicates dropped) -> %s\n" % (len(c.entries), c.dupes, args.out))
    for fam in sorted(fams):
        sys.stderr.write("  %-22s %5d\n" % (fam, fams[fam]))


if __name__ == "__main__":
    main()
