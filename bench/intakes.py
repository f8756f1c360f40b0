"""Several intakes, one failing (issue 19): what intakes a and b deliver while c refuses.

    .venv/bin/python -m bench.intakes [--events N] [--repeat N] [--scenarios LIST]

The real daemon (through its CLI and a TOML config, as users run it) with three intakes a, b
and c, each on its own tests.fake_intake.FakeIntake (distinct keys; each in a child process
of its own, so that the three do not share one GIL with each other or with the senders), and
three [[routes]] by source address: three senders bound to 127.0.0.2, .3 and .4 each push a
third of the stream (bench.stream: octet-counted HAProxy lines, 10 % other programs filtered
out) over one loopback TCP connection with socket.sendfile, all at once. A fresh daemon for
every run (spool.mode "overflow", every other setting its default: intake.auth_retry and
intake.retry_max 60 s). Scenarios:

  healthy  every intake answers 2xx. End-to-end events/s per intake (its events / (its last
           event received at its intake - its sender's first byte)) and in total (every event
           / (the last one received - the first byte sent)); the daemon's CPU-seconds
           (utime + stime of /proc/PID/stat) from just before the first byte to the moment
           every event is at its intake, and input messages (filtered ones included) per
           CPU-second.
  c-401    c answers every request 401 (a refused key). a and b as above; "a+b done" is the
           time from the first byte until every event of a and b is at its intake; the CPU
           window ends when that is done and the daemon has taken in all of c's events too.
           c's backlog then: batches (memory + spool) and events on the spool, from /metrics.
  c-down   the same with c's port closed (connection refused) from the start.

After each failing run, `haproxy-forwarder status --once` of that daemon is printed (its per-
intake lines). Each figure is the median of --repeat runs, all runs printed. Loopback only;
every child is killed on exit; every wait has a deadline; nothing asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib
import multiprocessing as mp
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from devtools.daemon import Daemon, run_cli
from haproxy_forwarder import statusreport

from . import procs, suts
from .machine import machine
from .stream import Stream, load_stream

NAMES = ("a", "b", "c")
SOURCES = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
# Distinct 32-character intake keys, one per FakeIntake (a wrong one would be refused).
KEYS = {name: (f"Bench{name.upper()}" * 6)[:32] for name in NAMES}
SCENARIOS = ("healthy", "c-401", "c-down")
STALL = 30.0  # seconds without a new event at an intake that is waited for: give up
FORCED_401 = 10_000  # answers queued at c; with auth_retry 60 s a run asks a few times
P = statusreport.PREFIX


# -- the fake intakes, each in its own process ----------------------------------------------------


def _serve(conn: Connection, key: str) -> None:
    """Child process: one FakeIntake on 127.0.0.1, driven by commands on `conn`."""
    # At run time, so that `mypy bench` (make lint) does not type-check the tests through here.
    fake = importlib.import_module("tests.fake_intake")
    fi = fake.FakeIntake(key=key)
    fi.start()
    conn.send(("ready", fi.url, fi.ca_file))
    try:
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):
                return
            op = cmd[0]
            if op == "wait":  # ("wait", n): (all there?, monotonic time when they were, count)
                conn.send(_wait(fi, int(cmd[1])))
            elif op == "count":
                conn.send(len(fi.events))
            elif op == "refuse":  # ("refuse", status): every request answered `status`
                fi.inject(int(cmd[1]), times=FORCED_401)
                conn.send("ok")
            elif op == "down":
                fi.set_down(bool(cmd[1]))
                conn.send("ok")
            elif op == "reset":
                fi.reset()
                conn.send("ok")
            elif op == "stop":
                conn.send("bye")
                return
    finally:
        fi.stop()


def _wait(fi: Any, n: int) -> tuple[bool, float, int]:
    last_n, last_change = -1, time.monotonic()
    while not fi.wait_for(n, 0.5):
        got = len(fi.events)
        now = time.monotonic()
        if got != last_n:
            last_n, last_change = got, now
        elif now - last_change > STALL:
            return False, now, got
    return True, time.monotonic(), len(fi.events)


class IntakeProc:
    """The driver's end of one child FakeIntake."""

    def __init__(self, name: str) -> None:
        self.name = name
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, KEYS[name]),
                                name=f"bench-intake-{name}", daemon=True)
        self.proc.start()
        child.close()
        tag, self.url, self.ca_file = self._recv(60)
        assert tag == "ready"

    def _recv(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError(f"intake {self.name} did not answer within {timeout:g} s")
        return self.conn.recv()

    def ask(self, *cmd: Any, timeout: float = 30.0) -> Any:
        self.conn.send(cmd)
        return self._recv(timeout)

    def start_wait(self, n: int) -> None:
        self.conn.send(("wait", n))

    def end_wait(self, timeout: float) -> tuple[bool, float, int]:
        ok, at, got = self._recv(timeout)
        return bool(ok), float(at), int(got)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("stop", timeout=5)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# -- senders bound to a source address ------------------------------------------------------------


class SourceSender(threading.Thread):
    """The stream over one loopback TCP connection from `source`, with socket.sendfile."""

    def __init__(self, source: str, port: int, stream: Stream, start: threading.Event) -> None:
        super().__init__(daemon=True, name=f"sender-{source}")
        self.source = source
        self.port = port
        self.stream = stream
        self.go = start
        self.t_first = 0.0
        self.t_done = 0.0
        self.error: str | None = None

    def run(self) -> None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, \
                    self.stream.path.open("rb") as f:
                s.bind((self.source, 0))
                s.settimeout(120)
                s.connect(("127.0.0.1", self.port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
                self.go.wait(30)
                self.t_first = time.monotonic()
                s.sendfile(f)
                self.t_done = time.monotonic()
                s.shutdown(socket.SHUT_WR)
                # Keep the socket until the daemon closes it (at its stop): closing first
                # could reset a connection with unread data.
                with contextlib.suppress(OSError):
                    while s.recv(65536):
                        pass
        except Exception as exc:  # reported by the caller
            self.error = f"{type(exc).__name__}: {exc}"


# -- one run --------------------------------------------------------------------------------------


@dataclass
class Run:
    scenario: str
    rates: dict[str, float] = field(default_factory=dict)  # intake -> end-to-end events/s
    total_rate: float = 0.0  # events of the healthy intakes / (last received - first byte)
    done_seconds: float = 0.0  # first byte -> every event of the healthy intakes received
    cpu: float = 0.0
    msgs_per_cpu_s: float = 0.0
    received: dict[str, int] = field(default_factory=dict)  # events at each intake
    c_backlog_batches: float | None = None
    c_in_memory_batches: float | None = None
    c_spool_events: float | None = None
    c_accepted: float | None = None
    c_requests: dict[str, float] = field(default_factory=dict)
    health: str = ""
    status_text: str = ""
    error: str | None = None


def daemon_config(tmp: Path, intakes: dict[str, IntakeProc]) -> dict[str, Any]:
    return {
        "shutdown_timeout": 5.0,
        "listen": {"tcp": ["127.0.0.1:0"], "udp": []},
        "spool": {"dir": str(tmp / f"spool-{time.monotonic_ns()}"), "mode": "overflow"},
        "log": {"format": "json", "level": "info"},
        "status": {"listen": "127.0.0.1:0"},
        "intakes": {name: {"url": ip.url, "key": KEYS[name], "ca_file": ip.ca_file}
                    for name, ip in intakes.items()},
        "routes": [{"source": [f"{SOURCES[name]}/32"], "intake": name} for name in intakes],
    }


def _intake_values(url: str, name: str) -> dict[str, float]:
    return statusreport.scrape(url).intakes.get(name, {})


def one_run(tmp: Path, intakes: dict[str, IntakeProc], stream: Stream, scenario: str) -> Run:
    res = Run(scenario)
    for ip in intakes.values():
        ip.ask("reset")
        ip.ask("down", False)
    if scenario == "c-401":
        intakes["c"].ask("refuse", 401)
    elif scenario == "c-down":
        intakes["c"].ask("down", True)
    healthy = [n for n in NAMES if scenario == "healthy" or n != "c"]
    d = Daemon(tmp, daemon_config(tmp, intakes), file_prefix="intakes", isolate_env=True,
               config_path=tmp / f"intakes-{time.monotonic_ns()}.toml", spawn=procs.spawn)
    d.start(30)
    url = f"http://127.0.0.1:{d.status_port}"
    try:
        go = threading.Event()
        senders = {n: SourceSender(SOURCES[n], d.tcp_port, stream, go) for n in NAMES}
        for s in senders.values():
            s.start()
        time.sleep(0.3)  # connected, start-up CPU settled out of the measured window
        cpu0 = procs.cpu_seconds(d.pid)
        for n in healthy:
            intakes[n].start_wait(stream.haproxy)
        go.set()
        deadline = 600.0
        done: dict[str, float] = {}
        for n in healthy:
            ok, at, got = intakes[n].end_wait(deadline)
            res.received[n] = got
            if not ok:
                res.error = f"intake {n} got {got} of {stream.haproxy} events (stalled)"
            done[n] = at
        # Failing c: all of its input taken in too (then its backlog is read).
        if scenario != "healthy" and not procs.wait_until(
                lambda: _intake_values(url, "c").get(P + "accepted_events_total", 0)
                >= stream.haproxy, 120, 0.05):
            res.error = "the daemon did not take in all of c's events within 120 s"
        res.cpu = procs.cpu_seconds(d.pid) - cpu0
        errors = [f"{n}: {s.error}" for n, s in senders.items() if s.error]
        if errors:
            res.error = "; ".join(errors)
        t0 = min(s.t_first for s in senders.values() if s.t_first) if any(
            s.t_first for s in senders.values()) else 0.0
        for n in healthy:
            span = done[n] - senders[n].t_first
            res.rates[n] = stream.haproxy / span if span > 0 else 0.0
        res.done_seconds = max(done.values()) - t0
        res.total_rate = len(healthy) * stream.haproxy / res.done_seconds
        res.msgs_per_cpu_s = 3 * stream.count / res.cpu if res.cpu > 0 else 0.0
        if scenario != "healthy":
            v = _intake_values(url, "c")
            res.c_backlog_batches = v.get(P + "backlog_batches")
            res.c_in_memory_batches = v.get(P + "in_memory_batches")
            res.c_spool_events = v.get(P + "spool_events")
            res.c_accepted = v.get(P + "accepted_events_total")
            res.c_requests = {cls: n for cls, n in _requests_by_class(url, "c").items() if n}
            res.received["c"] = int(intakes["c"].ask("count"))
            ok, _ = statusreport.health(url)
            res.health = "ok" if ok else "failing"
            out = run_cli("status", "--url", url, "--once")
            res.status_text = out.stdout.rstrip() + (f"\n(exit {out.returncode})")
    finally:
        if d.proc is not None:
            procs.stop(d.proc)
        d.close_files()
    return res


def _requests_by_class(url: str, intake: str) -> dict[str, float]:
    """intake_requests_total{intake, status_class} of one intake, by class."""
    from prometheus_client.parser import text_string_to_metric_families

    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(body):
        for sm in fam.samples:
            if sm.name == P + "intake_requests_total" and sm.labels.get("intake") == intake:
                out[sm.labels["status_class"]] = sm.value
    return out


# -- report ---------------------------------------------------------------------------------------


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def run_line(r: Run) -> str:
    if r.error:
        return f"  {r.scenario:<8} FAILED: {r.error}"
    rates = "  ".join(f"{n} {r.rates[n]:>9,.0f}" for n in NAMES if n in r.rates)
    line = (f"  {r.scenario:<8} ev/s e2e: {rates}  total {r.total_rate:>9,.0f}  "
            f"done {r.done_seconds:5.2f} s  cpu {r.cpu:5.2f} s ({r.msgs_per_cpu_s:,.0f} msgs/"
            f"CPU-s)  at the intakes {r.received}")
    if r.scenario != "healthy":
        line += (f"  c: backlog {_n(r.c_backlog_batches)} batches ({_n(r.c_in_memory_batches)} "
                 f"in memory), spool {_n(r.c_spool_events)} events, accepted "
                 f"{_n(r.c_accepted)}, requests {r.c_requests}, /healthz {r.health}")
    return line


def table(runs: dict[str, list[Run]], stream: Stream) -> list[str]:
    lines = ["| scenario | a ev/s | b ev/s | c ev/s | total ev/s (healthy intakes) | "
             "a+b all delivered (s) | daemon CPU-s | input msgs/CPU-s | c backlog |",
             "|---|---|---|---|---|---|---|---|---|"]
    for scenario, rs in runs.items():
        ok = [r for r in rs if not r.error]
        if not ok:
            lines.append(f"| {scenario} | FAILED | | | | | | | |")
            continue

        def med(name: str, rs: list[Run] = ok) -> str:
            vals = [r.rates[name] for r in rs if name in r.rates]
            return f"{_med(vals):,.0f}" if vals else "-"

        backlog = "-"
        if scenario != "healthy":
            last = ok[-1]
            backlog = (f"{_n(last.c_backlog_batches)} batches, {_n(last.c_spool_events)} "
                       f"events on the spool (of {stream.haproxy:,})")
        lines.append(
            f"| {scenario} | {med('a')} | {med('b')} | {med('c')} | "
            f"{_med([r.total_rate for r in ok]):,.0f} | "
            f"{_med([r.done_seconds for r in ok]):.2f} | "
            f"{_med([r.cpu for r in ok]):.2f} | {_med([r.msgs_per_cpu_s for r in ok]):,.0f} | "
            f"{backlog} |")
    return lines


def _sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # atexit then kills the children


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.intakes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=300_000,
                    help="frames in total, a third per sender (default 300,000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario (median kept)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, of {', '.join(SCENARIOS)}")
    args = ap.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    for source in SOURCES.values():  # 127.0.0.0/8 is all loopback on Linux
        with socket.socket() as s:
            s.bind((source, 0))
    suts.CACHE.mkdir(exist_ok=True)
    (suts.CACHE / ".gitignore").write_text("*\n")
    tmp = Path(tempfile.mkdtemp(prefix="intakes-", dir=suts.CACHE))
    m = machine()
    load_start = loadavg()
    per = args.events // 3
    stream = load_stream(per, suts.CACHE)
    print("several intakes, one failing (issue 19): python -m bench.intakes "
          f"--events {args.events} --repeat {args.repeat}", flush=True)
    print(f"  {m['date']}  commit {m['commit']}  nproc {m['nproc']}  cpu {m['cpu']}", flush=True)
    print(f"  load average at start {load_start}", flush=True)
    print(f"  3 senders (127.0.0.2/.3/.4 -> intakes a/b/c by [[routes]] source) x {per:,} "
          f"frames = {3 * per:,}; {stream.haproxy:,} HAProxy events per intake, the rest "
          "filtered out", flush=True)
    intakes: dict[str, IntakeProc] = {}
    runs: dict[str, list[Run]] = {s: [] for s in scenarios}
    try:
        for name in NAMES:
            intakes[name] = IntakeProc(name)
        for rnd in range(args.repeat):
            for scenario in scenarios:  # interleaved: each round runs every scenario once
                r = one_run(tmp, intakes, stream, scenario)
                runs[scenario].append(r)
                print(f"round {rnd + 1}" + run_line(r), flush=True)
        print(f"\nload average at end {loadavg()}\n")
        print("\n".join(table(runs, stream)))
        for scenario in scenarios:
            last = [r for r in runs[scenario] if r.status_text]
            if last:
                print(f"\n`haproxy-forwarder status --once` at the end of the last {scenario} "
                      "run:\n")
                print(last[-1].status_text)
    finally:
        for ip in intakes.values():
            ip.stop()
        procs.kill_children()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if any(r.error for rs in runs.values() for r in rs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
