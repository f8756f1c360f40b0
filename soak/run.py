"""The soak itself: the real daemon under a seeded fault schedule, senders on TCP, RELP
(rsyslog omrelp) and UDP, then a final drain and the ledger.

Everything listens on 127.0.0.1. The spool lives on an 8 MiB tmpfs when mounting one is
permitted (root); otherwise on the work folder's disk, and only spool.max_size fills up.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from devtools import REPO
from devtools.daemon import Daemon, base_config, write_toml
from devtools.keys import INTAKE_KEY

from .events import ID_RE, SOURCES, SentLog
from .intake import SoakIntake
from .ledger import DeadLetter, Inputs, Ledger, Report, RunInfo
from .metrics import Scrape, scrape
from .peers import free_port, have, imptcp_input, relp_rsyslog
from .report import render
from .schedule import (
    INTAKE_TIMEOUT,
    Episode,
    describe,
    draw_live,
    draw_schedule,
    draw_spool,
)
from .senders import RelpFeeder, Sender, TcpSender, UdpSender
from .spoolfault import Flip, flip_byte

TMPFS_SIZE = "8m"
SHUTDOWN_TIMEOUT = 3.0
DRAIN_TIMEOUT = 120.0
# rsyslog: reconnect to the forwarder every second (the shipped rule says 10).
FAST_RESUME = {'action.resumeInterval="10"': 'action.resumeInterval="1"'}


class Soak:
    def __init__(self, seed: int, minutes: float, work: Path, rates: dict[str, float],
                 tmpfs: bool, say: Callable[[str], None]) -> None:
        self.seed = seed
        self.seconds = minutes * 60
        self.work = work
        self.rates = rates
        self.want_tmpfs = tmpfs
        self.say = say
        self.rng = random.Random(seed * 7919 + 1)  # configs and flips (the schedule has its own)
        self.episodes = draw_schedule(seed, self.seconds)
        self.runs: list[RunInfo] = []
        self.flips: list[Flip] = []
        self.replayed: list[DeadLetter] = []
        self.problems: list[str] = []
        self.current = -1  # the run senders send to; -1 while none is up
        self.daemon: Daemon | None = None
        self.live = draw_live(self.rng)
        self.spool_cfg = draw_spool(self.rng)
        self.mounted = False
        self.tmpfs_used = False
        self.t0 = time.monotonic()
        self._scraper_stop = threading.Event()
        self._scraping: tuple[int, Daemon] | None = None
        self.final: Scrape | None = None
        self.code = ""
        self.daemon_tree: Path | None = None

    # -- set-up ------------------------------------------------------------------------------
    def _mount(self) -> None:
        self.spool_root = self.work / "spoolfs"
        self.spool_root.mkdir(parents=True, exist_ok=True)
        if self.want_tmpfs and os.geteuid() == 0:
            res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700",
                                  "tmpfs", str(self.spool_root)], capture_output=True, text=True)
            self.mounted = self.tmpfs_used = res.returncode == 0
            if not self.mounted:
                self.say(f"tmpfs: mount refused ({res.stderr.strip()}): the spool is on disk, "
                         "only spool.max_size fills up")
        else:
            self.say("tmpfs: not mounted (not root, or --no-tmpfs): only spool.max_size "
                     "fills up")
        self.spool_dir = self.spool_root / "spool"

    def _unmount(self) -> None:
        if self.spool_dir.exists():
            # Kept for a look after the run: the tmpfs goes with the unmount.
            shutil.copytree(self.spool_dir, self.work / "spool-at-end", dirs_exist_ok=True,
                            symlinks=True)
        if self.mounted:
            subprocess.run(["umount", str(self.spool_root)], check=False)
            self.mounted = False

    def config(self) -> dict[str, Any]:
        return base_config(
            self.work,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            listen={"tcp": [f"127.0.0.1:{self.ports['tcp']}"],
                    "udp": [f"127.0.0.1:{self.ports['udp']}"],
                    "relp": [f"127.0.0.1:{self.ports['relp']}"]},
            status={"listen": f"127.0.0.1:{self.ports['status']}"},
            intake={"url": self.intake.url, "ca_file": self.intake.ca_file, "key": INTAKE_KEY,
                    "timeout": INTAKE_TIMEOUT, "auth_retry": 1.0, **self.live["intake"]},
            batch=dict(self.live["batch"]),
            relp=dict(self.live["relp"]),
            spool={"dir": str(self.spool_dir), **self.spool_cfg},
            log={"format": "json", "stats_interval": 5.0},
        )

    # -- daemon runs -------------------------------------------------------------------------
    def start_run(self) -> None:
        idx = len(self.runs)
        cfg = self.config()
        d = Daemon(self.work, cfg, file_prefix=f"run{idx:03d}",
                   config_path=self.work / "config.toml", isolate_env=True, spawn=self._spawn)
        info = RunInfo(idx, cfg, t_spawn=time.monotonic())
        self.runs.append(info)
        try:
            d.start(timeout=60)
        except RuntimeError as exc:
            self.problems.append(f"run {idx} did not start: {str(exc)[-600:]}")
            raise
        self.daemon = d
        info.t_started = d.t_started
        opened = (d.events("spool_opened") + d.events("spool_recovered_torn_tail")
                  + d.events("spool_recovered_with_corruption"))
        info.opened = opened[-1] if opened else None
        self._scraping = (idx, d)
        self.current = idx
        sp = self.spool_cfg
        self.say(f"run {idx} started: spool {sp['mode']}/{sp['when_full']} "
                 f"{sp['max_size'] // 1024} KiB, dead letters {sp['dead_letter_max_size'] // 1024}"
                 f" KiB; {self._live_text()}; spool at open: {self._opened_text(info)}")

    def _spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        # `python -m` imports from its working folder first: --daemon-tree runs the daemon of
        # another copy of the sources (a candidate fix) under the same soak.
        if self.daemon_tree is not None:
            kw["cwd"] = self.daemon_tree
        return subprocess.Popen(argv, **kw)

    def _live_text(self) -> str:
        b, i = self.live["batch"], self.live["intake"]
        return (f"batch {b['max_events']}/{b['max_delay']}s in_flight {b['max_in_flight']}, "
                f"concurrency {i['concurrency']}, relp window {self.live['relp']['max_window']}")

    @staticmethod
    def _opened_text(info: RunInfo) -> str:
        o = info.opened
        if o is None:
            return "?"
        keys = ("event", "events", "corrupt_records", "quarantined", "truncated")
        return " ".join(f"{k}={o[k]}" for k in keys if k in o)

    def stop_run(self, how: str, flip: bool = False) -> None:
        d, run = self.daemon, self.runs[-1]
        assert d is not None and d.proc is not None
        if how == "kill":
            run.before_kill = scrape(self.ports["status"], time.monotonic()) or run.last
            run.t_signal = time.monotonic()
            self.current = -1
            d.proc.kill()
            d.proc.wait(30)
        else:
            run.t_signal = time.monotonic()
            self.current = -1
            d.proc.send_signal(signal.SIGTERM)
            try:
                rc = d.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.problems.append(f"run {run.index}: SIGTERM not obeyed within 60 s")
                d.proc.kill()
                rc = d.proc.wait(30)
            if rc != 0:
                self.problems.append(f"run {run.index}: exit code {rc} after SIGTERM")
            stopped = d.events("stopped")
            run.stopped = stopped[-1] if stopped else None
            if run.stopped is None:
                self.problems.append(f"run {run.index}: no `stopped` line after SIGTERM")
        run.t_exit = time.monotonic()
        run.end = how
        self._scraping = None
        d.close_files()
        self.daemon = None
        note = ""
        if run.stopped is not None:
            s = run.stopped
            note = (f" (stopped: in {s.get('events_in')} out {s.get('events_out')} held "
                    f"{s.get('events_held')} unaccounted {s.get('events_unaccounted')})")
            if s.get("events_unaccounted", 0):
                self.problems.append(
                    f"run {run.index}: its `stopped` line has events_unaccounted="
                    f"{s['events_unaccounted']} (in={s.get('events_in')} out="
                    f"{s.get('events_out')} held={s.get('events_held')})")
        self.say(f"run {run.index} {how}{note}")
        if flip:
            f = flip_byte(self.spool_dir, self.rng)
            if f is None:
                self.say("flip: no sealed segment with a record to damage")
            else:
                run.flip = f
                self.flips.append(f)
                self.say(f"flip: {f.describe()}")

    def hup(self) -> None:
        d = self.daemon
        assert d is not None
        before = len(d.events("reloaded")) + len(d.events("reload_failed"))
        self.live = draw_live(self.rng)
        write_toml(d.config_path, self.config())
        os.kill(d.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if len(d.events("reloaded")) + len(d.events("reload_failed")) > before:
                break
            time.sleep(0.1)
        else:
            self.problems.append(f"run {self.runs[-1].index}: no reload line 15 s after SIGHUP")
        failed = d.events("reload_failed")
        self.runs[-1].reloads += 1
        if len(failed) > self.runs[-1].reload_failures:
            self.runs[-1].reload_failures = len(failed)
            self.problems.append(f"run {self.runs[-1].index}: reload failed: {failed[-1]}")
        self.say(f"SIGHUP: {self._live_text()}")

    def _scraper(self) -> None:
        while not self._scraper_stop.wait(0.5):
            target = self._scraping
            if target is None:
                continue
            idx, _ = target
            s = scrape(self.ports["status"], time.monotonic())
            if s is not None and self._scraping is target:
                run = self.runs[idx]
                if run.first is None:
                    run.first = s
                run.last = s

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> Report:
        if not have("rsyslogd"):
            raise SystemExit("the soak needs rsyslogd and omrelp (Debian: rsyslog rsyslog-relp)")
        self.work.mkdir(parents=True, exist_ok=True)
        self._mount()
        self.ports = {"tcp": free_port(), "udp": free_port("udp"), "relp": free_port(),
                      "status": free_port(), "feed": free_port()}
        self.intake = SoakIntake(INTAKE_TIMEOUT)
        self.intake.start()
        rs = None
        senders: list[Sender] = []
        scraper = threading.Thread(target=self._scraper, daemon=True, name="soak-scrape")
        try:
            self.say(f"seed {self.seed}, {self.seconds / 60:g} min of faults, work {self.work}")
            self.say("schedule:\n" + describe(self.episodes))
            self.start_run()
            scraper.start()
            stats = self.work / "rsyslog-stats.json"
            rs = relp_rsyslog(
                self.work / "rsyslog", self.ports["relp"],
                substitutions=FAST_RESUME,
                extra_config=imptcp_input(self.ports["feed"]) + (
                    f'module(load="impstats" interval="1" format="json" log.syslog="off" '
                    f'log.file="{stats}")\n'))
            senders = [TcpSender(self.ports["tcp"], self.rates["tcp"], self._run_index),
                       RelpFeeder(self.ports["feed"], self.rates["relp"], self._run_index),
                       UdpSender(self.ports["udp"], self.rates["udp"], self._run_index)]
            for s in senders:
                s.start()
            self.t0 = time.monotonic()
            for ep in self.episodes:
                self._episode(ep, senders)
            self.intake.set_mode("ok")
            for s in senders:
                s.stop()
                if s.error is not None:
                    self.problems.append(f"sender {s.src} failed: {s.error!r}")
            self._drain(stats)
            self.stop_run("final")
        except Exception as exc:  # the ledger of what happened so far is still printed
            self.problems.append(f"soak aborted: {exc!r}")
        finally:
            for s in senders:
                s.stop_flag.set()
            self._scraper_stop.set()
            if self.daemon is not None and self.daemon.proc is not None:
                self.daemon.stop(signal.SIGKILL)
            if rs is not None:
                rs.stop()
            self.intake.stop()
            dead = self._dead_letters()
            self._unmount()
        inputs = Inputs(
            logs={**{src: SentLog(src) for src in SOURCES}, **{s.src: s.log for s in senders}},
            delivered=self.intake.delivered,
            refused_400=self.intake.refused_400, dead_letters=dead, runs=self.runs,
            flips=self.flips, intake_timeout=INTAKE_TIMEOUT,
            altered=len(self.intake.altered), foreign=len(self.intake.foreign))
        # Kept, so the ledger can be rebuilt after the fact: python -m soak --replay FILE.
        with (self.work / "ledger-inputs.pickle").open("wb") as f:
            pickle.dump(inputs, f)
        report = Ledger(inputs).build()
        self._continuity()
        report.problems += self.problems
        for req_no, text in self.intake.altered[:5]:
            report.example("altered", f"request {req_no}: {text}")
        for text in self.intake.foreign[:5]:
            report.example("foreign", text)
        return report

    def _continuity(self) -> None:
        """Across a clean stop (no byte flipped after it) the next run must find in the
        spool exactly what the stopped one said it held."""
        for prev, run in itertools.pairwise(self.runs):
            if prev.end != "term" or prev.flip is not None or prev.stopped is None:
                continue
            held = prev.stopped.get("events_held")
            recovered = run.counter("spool_recovered_events")
            if held is not None and int(held) != recovered:
                self.problems.append(
                    f"run {prev.index} stopped holding {held} events, run {run.index} "
                    f"recovered {recovered} from the spool")

    def _run_index(self) -> int:
        return self.current

    def _episode(self, ep: Episode, senders: list[Sender]) -> None:
        self.intake.set_mode(ep.intake)
        self.say(f"t={time.monotonic() - self.t0:6.1f}s intake {ep.intake} for {ep.length}s, "
                 f"then {ep.action}{' +flip' if ep.flip else ''}")
        end = self.t0 + ep.end
        while time.monotonic() < end:
            time.sleep(0.2)
            d = self.daemon
            if d is not None and d.proc is not None and d.proc.poll() is not None:
                run = self.runs[-1]
                self.problems.append(f"run {run.index} exited by itself "
                                     f"(code {d.proc.returncode}): {d.stderr_text()[-800:]}")
                run.t_signal = run.t_exit = time.monotonic()
                run.end = "died"
                self.current = -1
                self._scraping = None
                d.close_files()
                self.daemon = None
                self.start_run()
            for s in senders:
                if s.error is not None:
                    raise RuntimeError(f"sender {s.src} failed: {s.error!r}")
        if ep.action == "hup":
            self.hup()
        elif ep.action == "replay":
            self.replay_dead_letters()
        elif ep.action in ("term", "kill"):
            self.stop_run(ep.action, ep.flip)
            self.spool_cfg = draw_spool(self.rng)
            self.live = draw_live(self.rng)
            self.start_run()

    def _drain(self, stats: Path) -> None:
        """Senders stopped, intake healthy: wait until rsyslog holds nothing, the daemon
        holds nothing and the intake got nothing new for 3 s; then check the identity."""
        self.say("drain: senders stopped, intake ok")
        deadline = time.monotonic() + DRAIN_TIMEOUT
        last_n, last_change = -1, time.monotonic()
        why = ""
        while time.monotonic() < deadline:
            time.sleep(0.5)
            n = self.intake.delivered_events()
            if n != last_n:
                last_n, last_change = n, time.monotonic()
            s = scrape(self.ports["status"], time.monotonic())
            queued = rsyslog_queued(stats)
            if s is None:
                why = "no /metrics"
                continue
            held, pending = s.get("events_held"), s.get("acks_pending")
            requeue = self.requeue_left()
            why = (f"held {held:.0f}, acks pending {pending:.0f}, rsyslog queues {queued}, "
                   f"requeue files {requeue}, quiet {time.monotonic() - last_change:.1f}s")
            if held == 0 and pending == 0 and queued == 0 and requeue == 0 and \
                    time.monotonic() - last_change >= 3.0:
                self.final = s
                break
        else:
            self.problems.append(f"drain incomplete after {DRAIN_TIMEOUT:.0f}s: {why}")
            self.final = scrape(self.ports["status"], time.monotonic())
        if self.final is not None:
            ident = self.final.identity()
            self.say(f"drained: {why}; identity on /metrics: {ident}")
            if ident["unaccounted"] != 0 or ident["held"] != 0:
                self.problems.append(f"identity at rest does not hold: {ident}")
            if ident["gauge"] not in (0, -1):
                self.problems.append(f"events_unaccounted gauge at rest: {ident['gauge']}")
            if ident["gauge"] == -1:
                self.say("note: /metrics has no events_unaccounted gauge (checked by sum)")

    def _dead_letters(self) -> list[DeadLetter]:
        """Every dead letter: those still in the folder, and those a replay moved away."""
        return self._read_dead_letters() + self.replayed

    def _read_dead_letters(self, replayed: bool = False) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        folder = self.spool_dir / "dead-letter"
        for path in sorted(folder.glob("dead-letter-*.jsonl")) if folder.is_dir() else []:
            data = path.read_bytes()
            # A line being written (no newline yet) is not read: the file it goes into is
            # moved whole, so that event's dead letter is simply not seen.
            for line in data[: data.rfind(b"\n") + 1].splitlines():
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.problems.append(f"unreadable dead-letter line in {path.name}")
                    continue
                m = ID_RE.search(str(rec.get("event", "")).encode())
                if m is None:
                    self.problems.append(f"dead letter without a soak id: {line[:200]!r}")
                    continue
                k = (SOURCES.index(m[1].decode()) << 40) | int(m[2])
                out.append(DeadLetter(k, str(rec.get("reason")), rec.get("status"), replayed))
        return out

    def replay_dead_letters(self) -> None:
        """`haproxy-forwarder spool replay-dead-letter` while the daemon runs: the files go to
        requeue/, the daemon puts their events back in the spool. What they held is noted
        first: those dead letters count as outcomes, and each allows one more copy."""
        snapshot = self._read_dead_letters(replayed=True)
        argv = [sys.executable, "-m", "haproxy_forwarder", "--config",
                str(self.work / "config.toml"), "spool", "replay-dead-letter"]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                             cwd=self.daemon_tree or REPO, env=self.daemon_env())
        if res.returncode != 0:
            self.problems.append(f"replay-dead-letter exited {res.returncode}: "
                                 f"{(res.stdout + res.stderr)[-400:]}")
            return
        self.replayed += snapshot
        self.say(f"replay-dead-letter: {len(snapshot)} dead letters re-queued "
                 f"({res.stdout.strip()[-120:]})")

    def daemon_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("HAPROXY_FORWARDER_")}

    def requeue_left(self) -> int:
        folder = self.spool_dir / "requeue"
        return len(list(folder.glob("*.jsonl"))) if folder.is_dir() else 0


def rsyslog_queued(stats: Path) -> int:
    """Messages in rsyslog's queues (main and the omrelp action's), from impstats' last
    report; -1 before the first."""
    latest: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in stats.read_text(errors="replace").splitlines()[-400:]:
            start = line.find("{")
            if start < 0:
                continue
            try:
                rec = json.loads(line[start:])
            except ValueError:
                continue
            if rec.get("origin") == "core.queue":
                latest[str(rec.get("name"))] = int(rec.get("size", 0))
    return sum(latest.values()) if latest else -1


def main_run(seed: int, minutes: float, work: Path, rates: dict[str, float], tmpfs: bool,
             daemon_tree: Path | None = None) -> int:
    t_start = time.monotonic()
    log_path = work / "soak.log"
    work.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("a")

    def say(text: str) -> None:
        line = f"[soak {time.monotonic() - t_start:7.1f}s] {text}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    soak = Soak(seed, minutes, work, rates, tmpfs, say)
    soak.daemon_tree = daemon_tree
    soak.code = code_version() + (f"; daemon from {daemon_tree}" if daemon_tree else "")
    say(f"code: {soak.code}")
    report = soak.run()
    text = render(report, soak, time.monotonic() - t_start)
    print(text, flush=True)
    (work / "report.txt").write_text(text)
    log_file.close()
    return 1 if report.failed else 0


def replay(path: Path) -> int:
    """The ledger of a finished run again, from its saved inputs (no daemon runs)."""
    with path.open("rb") as f:
        inputs = pickle.load(f)  # our own file, written by the run above
    report = Ledger(inputs).build()
    for k, v in sorted(vars(report).items()):
        print(f"{k}: {v}")
    return 1 if report.failed else 0


def code_version() -> str:
    """The commit the daemon runs from, and whether its package differs from it."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
        return res.stdout.strip() if res.returncode == 0 else "?"
    changed = git("status", "--porcelain", "--", "haproxy_forwarder")
    return git("rev-parse", "--short", "HEAD") + (
        f" with uncommitted changes in {len(changed.splitlines())} haproxy_forwarder files"
        if changed and changed != "?" else "")
