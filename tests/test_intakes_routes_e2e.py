"""Several intakes and routes on the real daemon (issue 19), end to end.

What it proves, with `python -m haproxy_forwarder run` as a child, real fake intakes (HTTPS,
one key each) and senders on distinct loopback addresses:

- Every matcher routes: `listener` (a second TCP listener by its config address), `source`
  (the sender's address), `tls_name` (a client certificate's CN/SAN; a `*` stays within one
  label, so "beta.*" does not take "beta.clients.test"), `program` (alone, with `drop = true`,
  and with `source`), and the catch-all; the first matching route wins. Each event arrives at
  exactly its intake (the exact multiset per intake, nothing elsewhere), including connections
  whose programs go to different intakes; `delivered_events{intake}`,
  `unrouted_events{reason="drop"}` and `filtered_out` on /metrics equal what was sent.
- Without a catch-all, an event no route takes is counted as `unrouted_events{reason="no_route"}`
  and goes nowhere.
- A refused batch is dead-lettered in its intake's own folder (spool.dir/intakes/NAME), its
  records naming the intake and the reason; the other intake is unaffected; `spool stats`
  reports per intake; `spool replay-dead-letter`, run while the daemon runs, sends the events
  back to the intake that refused them, and to no other.
- No intake key appears in the daemon's stderr, /metrics, /healthz, the dead-letter files or
  `spool stats`, even when each intake echoes the request (holding its key) in its refusal.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import socket
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from devtools.daemon import Daemon, base_config, run_cli
from devtools.probe import wait_until
from devtools.traffic import lf_framed, octet_counted, traditional
from tests.fake_intake import FakeIntake

pytestmark = pytest.mark.timeout(120)

P = "haproxy_forwarder_"
SERVER_NAME = "forwarder.test"
MASK = "********"
Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers -------------------------------------------------------------------------------------


def new_key(letter: str) -> str:
    """A distinct 32-character alphanumeric key per intake, random per run."""
    return f"Key{letter}{uuid.uuid4().hex[:28]}"


@contextlib.contextmanager
def fake_intakes(keys: dict[str, str]) -> Iterator[dict[str, FakeIntake]]:
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(FakeIntake(key=key)) for name, key in keys.items()}


def intake_table(fakes: dict[str, FakeIntake], keys: dict[str, str],
                 **extra: Any) -> dict[str, dict[str, Any]]:
    return {name: {"url": fi.url, "ca_file": fi.ca_file, "key": keys[name],
                   **extra.get(name, {})} for name, fi in fakes.items()}


def ports(d: Daemon, proto: str) -> dict[str, int]:
    """{host: port} of the daemon's `proto` listeners, from its `listening` lines."""
    return {str(r["host"]): int(r["port"]) for r in d.events("listening")
            if r.get("proto") == proto}


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def metrics(port: int) -> Metrics:
    status, body = http_get(port, "/metrics")
    assert status == 200
    out: Metrics = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name.removeprefix(P), frozenset(s.labels.items()))] = s.value
    return out


def val(m: Metrics, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def total(m: Metrics, name: str) -> float:
    return sum(v for (n, _), v in m.items() if n == name)


def _finish(s: socket.socket) -> None:
    """Half-close and read until the daemon closes: everything sent was read."""
    s.shutdown(socket.SHUT_WR)
    s.settimeout(30)
    while s.recv(4096):
        pass


Address = tuple[str, int]


def send_tcp_from(source: str, to: Address, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.bind((source, 0))
        s.connect(to)
        s.sendall(payload)
        _finish(s)


def send_tls_from(source: str, to: Address, ctx: ssl.SSLContext, payload: bytes) -> None:
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(30)
    raw.bind((source, 0))
    raw.connect(to)
    with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as s:
        s.sendall(payload)
        plain = s.unwrap()
        _finish(plain)
        plain.close()


class Pki:
    """A CA signing the daemon's certificate and the clients' (CN and DNS SAN: the name)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.dir = folder
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def leaf(self, name: str) -> tuple[str, str]:
        cert = self.ca.issue_cert(name, common_name=name)
        crt, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(crt))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(crt), append=True)
        cert.private_key_pem.write_to_path(str(key))
        return str(crt), str(key)

    def client(self, name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(*self.leaf(name))
        return ctx


def assert_exactly(fakes: dict[str, FakeIntake],
                   want: dict[str, collections.Counter[str]]) -> None:
    for name, fi in fakes.items():
        got = collections.Counter(fi.event_texts())
        expected = want.get(name, collections.Counter())
        missing, extra = expected - got, got - expected
        assert not missing and not extra, (
            f"intake {name}: {sum(missing.values())} missing (e.g. {list(missing)[:3]}), "
            f"{sum(extra.values())} not its own (e.g. {list(extra)[:3]})")


def wait_settled(d: Daemon, frames: int, timeout: float = 45.0) -> Metrics:
    """Every frame read and accounted for (delivered, dead-lettered, unrouted or filtered out),
    nothing held: from there nothing more reaches an intake."""
    def settled() -> Metrics | None:
        m = metrics(d.status_port)
        out = (total(m, "delivered_events_total") + total(m, "dead_lettered_events_total")
               + total(m, "unrouted_events_total") + total(m, "filtered_out_total"))
        ok = (total(m, "received_frames_total") == frames and out == frames
              and total(m, "events_held") == 0 and total(m, "in_memory_batches") == 0)
        return m if ok else None
    return wait_until(settled, timeout, f"{frames} frames read and accounted for", step=0.1,
                      detail=lambda: d.stderr_text()[-3000:])


# -- 1. every matcher ------------------------------------------------------------------------------

ROUTES: list[dict[str, Any]] = [
    {"listener": "127.0.0.5:0", "intake": "c"},        # the second TCP listener, whoever sends
    {"source": ["127.0.0.2/32"], "intake": "a"},
    {"tls_name": ["beta.*"], "intake": "a"},             # one label: not beta.clients.test
    {"tls_name": ["alpha.*.test"], "intake": "b"},
    {"program": ["haproxy-drop"], "drop": True},
    {"source": ["127.0.0.3/32"], "program": ["haproxy-b"], "intake": "b"},
    {"intake": "c"},                                     # catch-all
]
PROGRAMS = ("haproxy", "haproxy-drop", "haproxy-b")
DROP = "(dropped)"

# (connection, listener, source address, client certificate name, {program: where it goes}).
CONNECTIONS: list[tuple[str, str, str, str | None, dict[str, str]]] = [
    ("tcp1-from2", "tcp1", "127.0.0.2", None, dict.fromkeys(PROGRAMS, "a")),
    ("tcp2-from2", "tcp2", "127.0.0.2", None, {"haproxy": "c", "haproxy-drop": "c"}),
    ("tcp1-from3", "tcp1", "127.0.0.3", None,
     {"haproxy": "c", "haproxy-drop": DROP, "haproxy-b": "b"}),
    ("tcp1-from4-lf", "tcp1", "127.0.0.4", None,
     {"haproxy": "c", "haproxy-drop": DROP, "haproxy-b": "c"}),
    ("tls-alpha-from4", "tls", "127.0.0.4", "alpha.clients.test", dict.fromkeys(PROGRAMS, "b")),
    ("tls-beta-from3", "tls", "127.0.0.3", "beta.clients.test",
     {"haproxy": "c", "haproxy-drop": DROP, "haproxy-b": "b"}),
    ("tcp2-from3", "tcp2", "127.0.0.3", None, {"haproxy-b": "c"}),
]
PER_PROGRAM = 150
FILTERED_EVERY = 5  # one sshd frame (not HAProxy: filtered out) after every 5 others


def test_every_matcher_sends_each_event_to_exactly_its_intake(tmp_path: Path) -> None:
    keys = {n: new_key(n.upper()) for n in "abc"}
    pki = Pki(tmp_path / "pki")
    cert, key = pki.leaf(SERVER_NAME)
    with fake_intakes(keys) as fakes:
        cfg = base_config(
            tmp_path,
            listen={"tcp": ["127.0.0.1:0", "127.0.0.5:0"], "udp": [], "tls": ["127.0.0.1:0"]},
            tls={"cert_file": cert, "key_file": key, "client_ca_file": str(pki.ca_file)},
            intakes=intake_table(fakes, keys), routes=ROUTES)
        with Daemon(tmp_path, cfg) as d:
            tcp, tls = ports(d, "tcp"), ports(d, "tls")
            to = {"tcp1": ("127.0.0.1", tcp["127.0.0.1"]), "tcp2": ("127.0.0.5", tcp["127.0.0.5"]),
                  "tls": ("127.0.0.1", tls["127.0.0.1"])}
            run = uuid.uuid4().hex[:8]
            want: dict[str, collections.Counter[str]] = collections.defaultdict(
                collections.Counter)
            frames = filtered = 0
            for label, listener, source, cert_name, where in CONNECTIONS:
                batch: list[bytes] = []
                for i in range(PER_PROGRAM):
                    for program, target in where.items():
                        text = f"{run} {label} {program} {i:04d} GET /items/{i} 200"
                        batch.append(traditional(program, text))
                        want[target][text] += 1
                        if len(batch) % FILTERED_EVERY == 0:
                            batch.append(traditional("sshd", f"{run} {label} ssh {i}"))
                            filtered += 1
                frames += len(batch)
                if cert_name is not None:
                    send_tls_from(source, to[listener], pki.client(cert_name),
                                  octet_counted(batch))
                elif label.endswith("-lf"):
                    send_tcp_from(source, to[listener], lf_framed(batch))
                else:
                    send_tcp_from(source, to[listener], octet_counted(batch))
            dropped = sum(want.pop(DROP).values())
            assert dropped == 3 * PER_PROGRAM

            m = wait_settled(d, frames)
            assert_exactly(fakes, want)
            for name in "abc":
                assert val(m, "delivered_events_total", intake=name) == sum(want[name].values())
            assert val(m, "unrouted_events_total", reason="drop") == dropped
            assert val(m, "unrouted_events_total", reason="no_route") == 0
            assert total(m, "filtered_out_total") == filtered
            assert total(m, "dead_lettered_events_total") == 0
            # Each fake intake only ever saw its own key (a wrong one is answered 401).
            for fi in fakes.values():
                assert all(r["status"] == 200 for r in fi.requests)
            assert d.stop() == 0
            assert "Traceback" not in d.stderr_text()


def test_an_event_no_route_takes_is_counted_as_no_route(tmp_path: Path) -> None:
    keys = {n: new_key(n.upper()) for n in "ab"}
    routes = [{"source": ["127.0.0.2/32"], "intake": "a"},
              {"program": ["haproxy-b"], "intake": "b"}]  # no catch-all
    with fake_intakes(keys) as fakes:
        cfg = base_config(tmp_path, listen={"tcp": ["127.0.0.1:0"], "udp": []},
                          intakes=intake_table(fakes, keys), routes=routes)
        with Daemon(tmp_path, cfg) as d:
            run = uuid.uuid4().hex[:8]
            to_a = [f"{run} from2 {program} {i}" for i in range(100)
                    for program in ("haproxy", "haproxy-b")]
            send_tcp_from("127.0.0.2", ("127.0.0.1", d.tcp_port), octet_counted(
                traditional(t.split()[2], t) for t in to_a))
            to_b = [f"{run} from3 haproxy-b {i}" for i in range(100)]
            unmatched = [f"{run} from3 haproxy {i}" for i in range(120)]
            send_tcp_from("127.0.0.3", ("127.0.0.1", d.tcp_port), octet_counted(
                [traditional("haproxy-b", t) for t in to_b]
                + [traditional("haproxy", t) for t in unmatched]))
            m = wait_settled(d, len(to_a) + len(to_b) + len(unmatched))
            assert_exactly(fakes, {"a": collections.Counter(to_a),
                                   "b": collections.Counter(to_b)})
            assert val(m, "unrouted_events_total", reason="no_route") == len(unmatched)
            assert val(m, "unrouted_events_total", reason="drop") == 0
            assert val(m, "delivered_events_total", intake="a") == len(to_a)
            assert val(m, "delivered_events_total", intake="b") == len(to_b)
            # The sender the table misses is named, once (not the one routed by source).
            said = d.events("events_unrouted")
            assert [(e["source"], e["listener"]) for e in said] == [
                ("127.0.0.3", f"tcp://127.0.0.1:{d.tcp_port}")], said
            assert d.stop() == 0


# -- 2. dead letters per intake, and their replay ------------------------------------------------


def spool_stats(config: Path) -> dict[str, Any]:
    r = run_cli("--config", str(config), "spool", "stats")
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = orjson.loads(r.stdout)
    return out


def dead_letter_records(folder: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for p in sorted((folder / "dead-letter").glob("*.jsonl"))
            for line in p.read_bytes().splitlines()]


def test_dead_letters_name_their_intake_and_replay_sends_them_back_to_it(
        tmp_path: Path) -> None:
    keys = {n: new_key(n.upper()) for n in "ab"}
    routes = [{"program": ["haproxy-b"], "intake": "b"}, {"intake": "a"}]
    with fake_intakes(keys) as fakes:
        fb = fakes["b"]
        fb.inject(400, times=1000, body=b'{"message": "Bad request"}')
        cfg = base_config(tmp_path, listen={"tcp": ["127.0.0.1:0"], "udp": []},
                          intakes=intake_table(fakes, keys), routes=routes)
        with Daemon(tmp_path, cfg) as d:
            run = uuid.uuid4().hex[:8]
            to_a = [f"{run} a {i}" for i in range(200)]
            to_b = [f"{run} b {i}" for i in range(200)]
            send_tcp_from("127.0.0.2", ("127.0.0.1", d.tcp_port), octet_counted(
                traditional(p, t) for pair in zip(to_a, to_b, strict=True)
                for p, t in zip(("haproxy", "haproxy-b"), pair, strict=True)))
            m = wait_settled(d, len(to_a) + len(to_b))
            assert val(m, "dead_lettered_events_total", intake="b", reason="rejected") == 200
            assert val(m, "dead_lettered_events_total", intake="a", reason="rejected") == 0
            assert val(m, "delivered_events_total", intake="a") == 200
            assert val(m, "delivered_events_total", intake="b") == 0
            assert_exactly(fakes, {"a": collections.Counter(to_a)})

            folder_a = tmp_path / "spool" / "intakes" / "a"
            folder_b = tmp_path / "spool" / "intakes" / "b"
            records = dead_letter_records(folder_b)
            assert sorted(r["event"] for r in records) == sorted(to_b)
            assert {(r["intake"], r["reason"], r["status"]) for r in records} == {
                ("b", "intake answered 400", 400)}
            assert not (folder_a / "dead-letter").exists()
            assert not (tmp_path / "spool" / "dead-letter").exists()  # not the default's
            logged = d.events("dead_lettered")
            assert logged and {r.get("intake") for r in logged} == {"b"}

            stats = spool_stats(d.config_path)
            assert set(stats) == {"intakes"} and set(stats["intakes"]) == {"a", "b"}
            sb, sa = stats["intakes"]["b"], stats["intakes"]["a"]
            assert sb["spool_dir"] == str(folder_b) and sa["spool_dir"] == str(folder_a)
            assert sb["dead_letter"]["events"] == 200 and sa["dead_letter"]["events"] == 0

            fb.reset()  # b takes events again
            bad = run_cli("--config", str(d.config_path), "spool", "replay-dead-letter",
                          "--intake", "nope")
            assert bad.returncode == 2 and "no such intake" in bad.stderr
            r = run_cli("--config", str(d.config_path), "spool", "replay-dead-letter")
            assert r.returncode == 0, r.stderr
            assert "intake a: no dead letters" in r.stdout
            assert "intake b: re-queued 200 events" in r.stdout

            assert fb.wait_for(200, 30), d.stderr_text()[-3000:]
            wait_until(lambda: val(metrics(d.status_port), "requeued_events_total",
                                   intake="b") == 200
                       and val(metrics(d.status_port), "delivered_events_total",
                               intake="b") == 200, 20, step=0.05)
            wait_until(lambda: spool_stats(d.config_path)["intakes"]["b"]["requeue"]
                       == {"files": [], "events": 0}, 20, step=0.2)
            m = metrics(d.status_port)
            assert val(m, "requeued_events_total", intake="a") == 0
            assert val(m, "delivered_events_total", intake="a") == 200
            assert_exactly(fakes, {"a": collections.Counter(to_a),
                                   "b": collections.Counter(to_b)})
            after = spool_stats(d.config_path)["intakes"]
            assert after["b"]["dead_letter"]["events"] == 0
            assert d.stop() == 0


# -- 3. the keys never show ---------------------------------------------------------------------


def test_no_intake_key_appears_anywhere_even_when_echoed(tmp_path: Path) -> None:
    keys = {n: new_key(n.upper()) for n in "abc"}
    # The key goes in the body (array, batch) or in a header (jsons); no gzip, so the echo of
    # the request holds it in clear.
    endpoints = {"a": "array", "b": "jsons", "c": "batch"}
    routes = [{"program": ["haproxy-a"], "intake": "a"},
              {"program": ["haproxy-b"], "intake": "b"}, {"intake": "c"}]
    with fake_intakes(keys) as fakes:
        for fi in fakes.values():
            fi.inject(400, echo=True)  # the first request of each: refused, echoed back
        extra = {n: {"endpoint": endpoints[n], "gzip": False} for n in keys}
        cfg = base_config(tmp_path, listen={"tcp": ["127.0.0.1:0"], "udp": []},
                          intakes=intake_table(fakes, keys, **extra), routes=routes)
        with Daemon(tmp_path, cfg) as d:
            run = uuid.uuid4().hex[:8]
            programs = {"a": "haproxy-a", "b": "haproxy-b", "c": "haproxy"}
            sent = {n: [f"{run} {n} {i}" for i in range(60)] for n in keys}
            send_tcp_from("127.0.0.4", ("127.0.0.1", d.tcp_port), octet_counted(
                traditional(programs[n], t) for n in keys for t in sent[n]))
            m = wait_settled(d, sum(len(v) for v in sent.values()))
            for name, fi in fakes.items():
                assert fi.requests[0]["forced"] and fi.requests[0]["status"] == 400
                dead = val(m, "dead_lettered_events_total", intake=name, reason="rejected")
                assert dead >= 1
                assert dead + val(m, "delivered_events_total", intake=name) == 60
            for name in keys:
                records = dead_letter_records(tmp_path / "spool" / "intakes" / name)
                assert records and {r["intake"] for r in records} == {name}
                if name != "b":  # jsons: the key is in a header, echoed past the kept 500
                    # The refusal really carried the key: the daemon masked it.
                    assert all(MASK in r["response"] for r in records), records[0]

            places: dict[str, bytes] = {
                "/metrics": http_get(d.status_port, "/metrics")[1],
                "/healthz": http_get(d.status_port, "/healthz")[1],
                "spool stats": run_cli("--config", str(d.config_path), "spool",
                                       "stats").stdout.encode(),
            }
            for p in sorted((tmp_path / "spool").rglob("dead-letter/*.jsonl")):
                places[str(p.relative_to(tmp_path))] = p.read_bytes()
            assert d.stop() == 0
            places["stderr"] = d.stderr_path.read_bytes()
            # One file per intake and day: 3 (or more, should the test straddle midnight UTC).
            assert len(places) >= 4 + 3
            for where, content in places.items():
                for name, key in keys.items():
                    assert key.encode() not in content, f"intake {name}'s key in {where}"
