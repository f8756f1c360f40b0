"""Real rsyslog (omrelp, the shipped rule) to the real daemon, killed with SIGKILL twice.

100k HAProxy lines go into rsyslog at a steady rate (over an imptcp input on loopback) while
the forwarder (devtools/daemon.py, a subprocess with its spool) is killed and restarted twice.
With RELP every line reaches the FakeIntake (duplicates counted and printed); the same with the
intake down during the first kill (the events wait in the spool). The same schedule with
plain TCP (the shipped reliable omfwd rule) measures what TCP loses: printed, not asserted.
"""

from __future__ import annotations

import functools
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import Daemon, base_config
from devtools.probe import metric, steady, wait_until
from tests.conftest import intake_section
from tests.fake_intake import FakeIntake
from tests.realpeers import (
    RSYSLOG_RULE,
    RSYSLOG_RULE_RELIABLE,
    RelpRsyslogProcess,
    RsyslogProcess,
    free_port,
    imptcp_input,
    needs,
)

N = 100_000
RATE = 6000  # lines per second into rsyslog
KILLS = (0.3, 0.65)  # when in the stream (share of the lines sent) the forwarder is killed
DOWN_FOR = 1.0  # seconds between a kill and the restart
SEQ = re.compile(r"seq=(\d+)")
FAST_RESUME = {'action.resumeInterval="10"': 'action.resumeInterval="1"'}

pytestmark = needs("rsyslogd")


def omrelp_installed() -> bool:
    return any(Path(d).glob("omrelp.so") for d in ("/usr/lib/x86_64-linux-gnu/rsyslog",
                                                   "/usr/lib/rsyslog", "/usr/lib64/rsyslog"))


class Sender(threading.Thread):
    """N HAProxy lines (LF framing) to rsyslog's imptcp input, RATE per second."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.sent = 0
        self.error: BaseException | None = None

    def reached(self, count: float) -> bool:
        return self.sent >= count

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                step = 50
                start = time.monotonic()
                while self.sent < N:
                    k = min(step, N - self.sent)
                    lines = b"".join(
                        b"<134>Dec  2 03:00:00 web1 haproxy[4242]: 10.0.0.1:40000 "
                        b"[02/Dec/2026:03:00:00.000] fe be/srv 0/0/1/2/3 200 12 - - ---- "
                        b"seq=%06d\n" % i for i in range(self.sent, self.sent + k))
                    s.sendall(lines)
                    self.sent += k
                    pause = start + self.sent / RATE - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)  # the sender's RATE: the load, not a wait
        except BaseException as exc:  # reported by the test
            self.error = exc


@dataclass
class Outcome:
    received: int
    unique: int
    duplicates: int
    lost: int
    seconds: float
    # Events found in the spool by each restarted forwarder (its `spool_opened` line).
    recovered: list[int]

    def line(self, what: str) -> str:
        return (f"{what}: {N} sent, {self.received} received, {self.unique} distinct, "
                f"{self.duplicates} duplicates, {self.lost} lost "
                f"({100 * self.lost / N:.2f} %), {self.seconds:.1f} s, "
                f"spool at the restarts: {self.recovered} events")


def seqs(intake: FakeIntake) -> Counter[int]:
    out: Counter[int] = Counter()
    for text in intake.event_texts():
        m = SEQ.search(text)
        if m:
            out[int(m[1])] += 1
    return out


def spooled(status_port: int) -> bool:
    return metric(status_port, "spool_events") > 0


def kill(d: Daemon) -> None:
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait(10)
    d.close_files()


# The rsyslog rules compared: the shipped omrelp rule, the shipped reliable omfwd rule (the
# same disk-assisted queue, plain TCP), the basic omfwd rule (no queue of its own), and the
# basic rule over UDP.
RULES = ("relp", "tcp-reliable", "tcp-basic", "udp")


def opened(d: Daemon) -> list[dict[str, Any]]:
    """The line of the daemon's spool recovery: clean, or with a torn tail cut."""
    return d.events("spool_opened") + d.events("spool_recovered_torn_tail")


def run_schedule(tmp: Path, intake: FakeIntake, rule: str,
                 intake_down_first_kill: bool = False) -> Outcome:
    """N lines through rsyslog with `rule` to the forwarder, SIGKILLed at KILLS."""
    assert rule in RULES
    relp = rule == "relp"
    t0 = time.monotonic()
    port = free_port()
    addr = f"127.0.0.1:{port}"
    listen: dict[str, Any] = {"tcp": [], "udp": [], "relp": []}
    listen["relp" if relp else "udp" if rule == "udp" else "tcp"] = [addr]
    cfg = base_config(
        tmp / "fwd", listen=listen, intake=intake_section(intake, retry_max=0.5),
        batch={"max_delay": 0.2},
    )
    (tmp / "fwd").mkdir(parents=True, exist_ok=True)

    def forwarder() -> Daemon:
        return Daemon(tmp / "fwd", cfg).start()

    d = forwarder()
    recovered: list[int] = []
    in_port = free_port()
    rs_args: dict[str, Any] = {"extra_config": imptcp_input(in_port)}
    if relp:
        rs: RsyslogProcess = RelpRsyslogProcess(
            tmp / "rs", "127.0.0.1", port,
            substitutions=FAST_RESUME, **rs_args)
    elif rule == "tcp-reliable":
        rs = RsyslogProcess(tmp / "rs", "127.0.0.1", port, rule_file=RSYSLOG_RULE_RELIABLE,
                            substitutions=FAST_RESUME, **rs_args)
    elif rule == "tcp-basic":
        rs = RsyslogProcess(tmp / "rs", "127.0.0.1", port, rule_file=RSYSLOG_RULE, **rs_args)
    else:
        rs = RsyslogProcess(tmp / "rs", "127.0.0.1", port, rule_file=RSYSLOG_RULE,
                            substitutions={'protocol="tcp"': 'protocol="udp"'}, **rs_args)
    try:
        sender = Sender(in_port)
        sender.start()
        for i, share in enumerate(KILLS):
            wait_until(functools.partial(sender.reached, N * share), 60,
                       f"the sender {share:.0%} through its lines",
                       detail=lambda: f"sender error: {sender.error!r}")
            down = intake_down_first_kill and i == 0
            if down:
                intake.set_down(True)
                # Answered meanwhile: they wait in the spool (write-ahead), kill or not.
                wait_until(functools.partial(spooled, d.status_port), 10,
                           "events on the spool while the intake is down")
            kill(d)
            time.sleep(DOWN_FOR)  # the outage itself (the scenario), not a wait
            d = forwarder()
            # A record being written at the kill is a torn tail, cut at recovery (it was
            # never fsync'd, so never answered): either line says what the spool holds.
            wait_until(functools.partial(opened, d), 10, "the spool recovery line",
                       detail=d.stderr_text)
            recovered.append(int(opened(d)[-1]["events"]))
            if down:
                # Back once the new run has answered (spooled) more of the stream meanwhile.
                wait_until(functools.partial(metric, d.status_port,
                                             "spool_appended_events_total"),
                           10, "the restarted forwarder spooling new events")
                intake.set_down(False)
        sender.join(60)
        assert sender.error is None, sender.error
        if relp:
            wait_until(lambda: len(seqs(intake)) >= N, 40, f"all {N} lines at the intake",
                       step=0.5, detail=lambda: f"{len(seqs(intake))} distinct")
        else:
            # TCP: nothing says when everything that will arrive has arrived; wait until
            # nothing new comes for 3 s.
            wait_until(steady(lambda: len(intake.events), 3.0), 40,
                       "no new event at the intake for 3 s", step=0.25)
        got = seqs(intake)
        received = sum(got.values())
        assert not [s for s in got if not 0 <= s < N]
        return Outcome(received, len(got), received - len(got), N - len(got),
                       time.monotonic() - t0, recovered)
    finally:
        rs.stop()
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


@pytest.mark.skipif(not omrelp_installed(), reason="requires Debian package rsyslog-relp")
def test_relp_loses_nothing_across_two_sigkills(tmp_path: Path, intake: FakeIntake) -> None:
    out = run_schedule(tmp_path, intake, "relp")
    print("\n" + out.line("RELP, forwarder SIGKILLed twice"))
    assert out.lost == 0, out.line("RELP")


@pytest.mark.skipif(not omrelp_installed(), reason="requires Debian package rsyslog-relp")
def test_relp_loses_nothing_with_the_intake_down_during_a_kill(
        tmp_path: Path, intake: FakeIntake) -> None:
    out = run_schedule(tmp_path, intake, "relp", intake_down_first_kill=True)
    print("\n" + out.line("RELP, SIGKILLed twice, intake down during the first"))
    assert out.lost == 0, out.line("RELP")
    # What was answered while the intake was down survived the kill in the spool.
    assert out.recovered[0] > 0, out.line("RELP")
