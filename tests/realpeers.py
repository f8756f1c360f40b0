"""Start the REAL peers of haproxy-forwarder (rsyslogd, haproxy, logger) from tests.

Everything runs in the foreground, as child processes of the test, with its config, sockets,
pid files, queues and log files inside a temp dir, and network traffic on 127.0.0.1 only. No
system file is read or written (no /dev/log, no /var/log, no /run, no /etc/rsyslog.d), so the
helpers work the same as root (CI) and as an ordinary user, and never touch a system
rsyslog or haproxy that may be running on the machine.

The programs come from Debian packages: ``rsyslog`` (rsyslogd, 8.2302 in bookworm),
``haproxy`` (2.6) and ``bsdutils`` (util-linux ``logger``). When one is missing, the tests that
need it are skipped with a message that names the package (see ``needs`` / ``require``).

Typical use::

    @needs("rsyslogd", "haproxy")
    def test_x(tmp_path):
        with RsyslogProcess(tmp_path / "rs", "127.0.0.1", port) as rs, \
             HaproxyProcess(tmp_path / "hap", cfg_with(rs.socket_path)) as hap:
            ...

The rsyslog instance includes the SHIPPED rule file (``config/rsyslog/haproxy-forwarder.conf``),
with only the forwarder address, the port, the local log file path and, for variants, the
template and the framing changed by plain text substitution: the tests exercise the very
rule users install.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Literal

import pytest

from devtools import REPO as REPO_ROOT
from devtools.probe import wait_until

RSYSLOG_RULE = REPO_ROOT / "config" / "rsyslog" / "haproxy-forwarder.conf"
RSYSLOG_RULE_RELIABLE = REPO_ROOT / "config" / "rsyslog" / "haproxy-forwarder-reliable.conf"
HAPROXY_EXAMPLE = REPO_ROOT / "config" / "haproxy" / "haproxy-log-direct.cfg"

# Program -> Debian package that ships it (named in skip messages).
DEBIAN_PACKAGE = {
    "rsyslogd": "rsyslog",
    "haproxy": "haproxy",
    "logger": "bsdutils",
}

# rsyslogd and haproxy live in /usr/sbin, which an ordinary user's PATH often lacks.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# The placeholders of the shipped rule files, replaced by text substitution.
RULE_TARGET = 'target="FORWARDER_HOST"'
RULE_PORT = 'port="1514"'
RULE_FRAMING = 'TCP_Framing="octet-counted"'
RULE_PROTOCOL = 'protocol="tcp"'
RULE_LOCAL_FILE = "/var/log/haproxy.log"

# AF_UNIX sun_path is 108 bytes on Linux, including the NUL.
_MAX_UNIX_PATH = 100

Framing = Literal["octet-counted"] | None


# --------------------------------------------------------------------------- discovery / skip


def which(program: str) -> str | None:
    """Full path of ``program``, looking in PATH and in the sbin directories too."""
    found = shutil.which(program)
    if found:
        return found
    extra = os.pathsep.join(_EXTRA_PATH)
    return shutil.which(program, path=extra)


def have(program: str) -> bool:
    """True when ``program`` (e.g. "rsyslogd", "haproxy", "logger") can be run."""
    return which(program) is not None


def _missing_reason(programs: tuple[str, ...]) -> str | None:
    missing = [p for p in programs if not have(p)]
    if not missing:
        return None
    packages = sorted({DEBIAN_PACKAGE.get(p, p) for p in missing})
    what = ", ".join(packages)
    plural = "s" if len(packages) > 1 else ""
    return f"requires Debian package{plural} {what} ({', '.join(missing)} not found)"


def needs(*programs: str) -> pytest.MarkDecorator:
    """``@needs("rsyslogd", "logger")``: skip the test unless every program is installed.

    The skip reason names the Debian package, e.g. "requires Debian package rsyslog".
    """
    reason = _missing_reason(programs)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def require(*programs: str) -> None:
    """Inside a test or fixture: ``pytest.skip`` unless every program is installed."""
    reason = _missing_reason(programs)
    if reason is not None:
        pytest.skip(reason)


def _exe(program: str) -> str:
    path = which(program)
    if path is None:
        pytest.skip(_missing_reason((program,)) or program)
    return path


def _validate(argv: list[str], what: str, extra: str = "") -> None:
    """Run a program's config check; raise RuntimeError with its messages if it refuses."""
    res = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
    )
    if res.returncode != 0:
        raise RuntimeError(f"{what}:\n{res.stdout}{res.stderr}{extra}")


# --------------------------------------------------------------------------- small helpers


def free_port(kind: Literal["tcp", "udp"] = "tcp") -> int:
    """A port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close).

    There is an unavoidable race with other processes; prefer binding port 0 yourself and
    passing the socket's port along when you own the listener.
    """
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, sock_type) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_listening(port: int) -> bool:
    """True when some socket LISTENs on TCP ``port`` (any address), without connecting.

    Reads /proc/net/tcp{,6}: a probe connection would make HAProxy log a "<BADREQ>" 400
    ``CR--`` line (HTTP mode) or an empty session (TCP mode) unless ``option dontlognull``
    is set, which would pollute what the test receives. Falls back to connecting when
    /proc is not available.
    """
    wanted = f":{port:04X}"
    found_proc = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found_proc = True
        for line in lines:
            fields = line.split()
            # fields[1] = local "ADDR:PORT" in hex, fields[3] = state, 0A = LISTEN
            if len(fields) > 3 and fields[1].endswith(wanted) and fields[3] == "0A":
                return True
    if found_proc:
        return False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


def _substitute(text: str, old: str, new: str, what: str, rule_file: Path) -> str:
    if old not in text:
        raise AssertionError(
            f"{rule_file}: expected the placeholder {old!r} ({what}) in the shipped rule; "
            "the rule changed, update tests/realpeers.py accordingly"
        )
    return text.replace(old, new)


def end_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send ``sig`` to a peer still running, wait up to ``timeout`` s, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class _Process:
    """Common start/stop for a foreground child with output captured to a file."""

    name = "process"
    proc: subprocess.Popen[bytes] | None
    output_path: Path

    def _spawn(self, argv: list[str]) -> None:
        self._output = self.output_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on pytest does not hit it; we stop it
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        """What the program printed on stdout/stderr so far."""
        return _tail(self.output_path)

    def _fail(self, message: str) -> None:
        self.stop()
        raise RuntimeError(f"{self.name}: {message}\n--- output ---\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` (SIGTERM), wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        end_process(proc, sig, timeout)
        self._output.close()
        self._cleanup()
        return proc.returncode

    def _cleanup(self) -> None:
        pass

    def __enter__(self) -> _Process:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- rsyslogd


class RsyslogProcess(_Process):
    """A private ``rsyslogd -n`` with the shipped HAProxy rule, forwarding to a test port.

    Files in ``tmpdir``: ``rsyslog.conf`` (main config), ``rule.conf`` (the shipped rule after
    substitution), ``work/`` (workDirectory: queue files), ``haproxy.log`` (the rule's local
    file, replacing /var/log/haproxy.log), ``all.log`` (every message rsyslog received,
    including rsyslogd's own ones: use it to tell "not received" from "not forwarded"),
    ``rsyslogd.out`` (stdout/stderr) and ``rsyslogd.pid``.

    Input: one imuxsock socket, ``.socket_path`` (a unix datagram socket, like /dev/log),
    with rate limiting explicitly OFF (RateLimit.Interval="0", the 8.2302 default for an
    input(); with an interval set, imuxsock keeps 200 messages per interval per SENDING pid
    and all of HAProxy is one pid) and the system socket /dev/log NOT used. No imklog, no
    network input.

    ``template``: None keeps the rule's default (RSYSLOG_TraditionalForwardFormat), otherwise
    ``template="<name>"`` is added to the omfwd action (e.g. "RSYSLOG_ForwardFormat",
    "RSYSLOG_SyslogProtocol23Format"). ``framing``: "octet-counted" keeps the rule as shipped;
    None switches to TCP_Framing="traditional" (LF after each message).
    ``substitutions``: further {old: new} text replacements in the rule (each ``old`` must
    occur), e.g. {'action.resumeInterval="10"': 'action.resumeInterval="1"'} to keep a
    test short. ``extra_config``: RainerScript appended after the rule.

    Starting again with the same ``tmpdir`` (a new instance after ``stop()``) reuses the
    work directory, hence the disk queue of the reliable rule: that is an rsyslog restart.
    """

    name = "rsyslogd"

    def __init__(
        self,
        tmpdir: Path | str,
        forward_host: str,
        forward_port: int,
        template: str | None = None,
        framing: Framing = "octet-counted",
        rule_file: Path | str = RSYSLOG_RULE,
        *,
        extra_config: str = "",
        substitutions: dict[str, str] | None = None,
        start: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.proc = None
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.forward_host = forward_host
        self.forward_port = forward_port
        self.rule_file = Path(rule_file)
        if not self.rule_file.is_absolute():
            self.rule_file = REPO_ROOT / self.rule_file
        self.workdir = self.tmpdir / "work"
        self.workdir.mkdir(exist_ok=True)
        self.conf_path = self.tmpdir / "rsyslog.conf"
        self.rule_path = self.tmpdir / "rule.conf"
        self.local_log_path = self.tmpdir / "haproxy.log"
        self.all_log_path = self.tmpdir / "all.log"
        self.pid_path = self.tmpdir / "rsyslogd.pid"
        self.output_path = self.tmpdir / "rsyslogd.out"
        self._local_offset = 0
        self._local_lines = 0
        self._short_dir: str | None = None
        sock = self.tmpdir / "log.sock"
        if len(str(sock)) > _MAX_UNIX_PATH:
            self._short_dir = tempfile.mkdtemp(prefix="rsyslog-")
            sock = Path(self._short_dir) / "log.sock"
        self.socket_path = sock

        rule = self.rule_file.read_text()
        rule = _substitute(
            rule, RULE_TARGET, f'target="{forward_host}"', "forwarder host", self.rule_file
        )
        rule = _substitute(rule, RULE_PORT, f'port="{forward_port}"', "port", self.rule_file)
        rule = _substitute(
            rule, RULE_LOCAL_FILE, str(self.local_log_path), "local file", self.rule_file
        )
        if template is not None:
            rule = _substitute(
                rule,
                RULE_PROTOCOL,
                f'{RULE_PROTOCOL} template="{template}"',
                "template",
                self.rule_file,
            )
        if framing is None:
            rule = _substitute(
                rule, RULE_FRAMING, 'TCP_Framing="traditional"', "framing", self.rule_file
            )
        for old_text, new_text in (substitutions or {}).items():
            rule = _substitute(rule, old_text, new_text, "test substitution", self.rule_file)
        self.rule_path.write_text(rule)

        self.conf_path.write_text(
            f"""# Written by tests/realpeers.py: a private rsyslogd, nothing system-wide.
global(
    workDirectory="{self.workdir}"
    # rsyslogd's own messages go through the rules below (into all.log), not to /dev/log.
    processInternalMessages="on"
    maxMessageSize="64k"
)
# Unix socket input only; the system socket (/dev/log) is not created nor used.
module(load="imuxsock" SysSock.Use="off")
# RateLimit.Interval 0: no per-process rate limiting (bursts of HAProxy logs must all pass).
input(type="imuxsock" Socket="{self.socket_path}" RateLimit.Interval="0" CreatePath="on")

# ---- the shipped rule ({self.rule_file.name}), substituted ----
include(file="{self.rule_path}")
# ---- end of the shipped rule ----

{extra_config}
# Everything, for diagnostics.
action(type="omfile" file="{self.all_log_path}" template="RSYSLOG_FileFormat")
"""
        )
        if start:
            self.start(timeout)

    def check_config(self) -> None:
        """``rsyslogd -N1``: raise RuntimeError with rsyslog's messages on a config error."""
        _validate(
            [_exe("rsyslogd"), "-N1", "-f", str(self.conf_path)],
            f"rsyslogd -N1 rejected {self.conf_path} (rule {self.rule_path})",
        )

    def start(self, timeout: float = 10.0) -> None:
        self.check_config()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._spawn(
            [_exe("rsyslogd"), "-n", "-f", str(self.conf_path), "-i", str(self.pid_path)]
        )
        with contextlib.suppress(AssertionError):  # said below, with rsyslog's output
            wait_until(lambda: self.socket_path.exists() or not self.running(), timeout,
                       f"rsyslog's socket {self.socket_path}")
        if not self.running():
            self._fail(f"exited early with code {self.proc.returncode if self.proc else '?'}")
        if not self.socket_path.exists():
            self._fail(f"socket {self.socket_path} not created within {timeout} s")

    def local_lines(self) -> int:
        """Lines in the rule's local copy (``haproxy.log``) so far: the messages rsyslog has
        routed to the rule. Cheap to call often: only the bytes appended since the last
        call are read.

        Use it to keep a burst of HAProxy lines within what the unix socket can queue: a
        unix datagram socket holds at most ``net.unix.max_dgram_qlen`` datagrams (10 by
        default on Linux) and HAProxy, which never waits, DROPS a log line that finds the
        queue full (it only counts it, as DroppedLogs), e.g. when rsyslog's input thread
        is not scheduled for a few milliseconds on a busy machine.
        """
        try:
            with self.local_log_path.open("rb") as f:
                f.seek(self._local_offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        self._local_offset += len(data)
        self._local_lines += data.count(b"\n")
        return self._local_lines

    def _cleanup(self) -> None:
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None

    def __enter__(self) -> RsyslogProcess:
        return self


def logger_cmd(
    socket_path: Path | str,
    tag: str,
    message: str,
    *,
    priority: str = "local0.info",
    with_pid: bool = False,
) -> list[str]:
    """argv for util-linux ``logger`` sending one message to a unix datagram socket.

    ``--socket-errors=on`` makes logger fail (exit 1) when the socket is missing instead of
    silently succeeding. logger writes the local format ``<PRI>Mmm dd hh:mm:ss TAG: MSG``
    (``TAG[PID]:`` with ``with_pid``), without a hostname, to unix sockets.
    """
    argv = [_exe("logger"), "-u", str(socket_path), "-d", "--socket-errors=on"]
    argv += ["-t", tag, "-p", priority]
    if with_pid:
        argv.append("-i")
    argv += ["--", message]
    return argv


def send_logger(
    socket_path: Path | str,
    tag: str,
    message: str,
    *,
    priority: str = "local0.info",
    with_pid: bool = False,
) -> None:
    """Run ``logger_cmd(...)``; raise CalledProcessError with logger's stderr on failure."""
    argv = logger_cmd(socket_path, tag, message, priority=priority, with_pid=with_pid)
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)


# --------------------------------------------------------------------------- haproxy

_BIND_RE = re.compile(r"^\s*bind\s+(\S+)", re.MULTILINE)
_LOOPBACK = ("127.", "localhost", "[::1]", "::1", "ipv4@127.", "ipv6@::1")


def _bind_addresses(cfg_text: str) -> list[str]:
    return _BIND_RE.findall(cfg_text)


class HaproxyProcess(_Process):
    """``haproxy -db -f <tmpdir>/haproxy.cfg`` in the foreground, validated with ``-c`` first.

    ``cfg_text`` is the whole configuration. Keep it free of ``daemon``, ``chroot``,
    ``user``/``group``, ``stats socket /run/...`` and ``log /dev/log``; every ``bind`` must be on
    loopback (checked). ``port``: the TCP port to wait for; default: the port of the first
    ``bind`` line; with no ``bind`` line (a logging-only config), start is not awaited beyond
    the process staying up for a moment.

    ``stop()`` sends SIGTERM (hard stop: immediate, no "Proxy stopped" log line); use
    ``stop(signal.SIGUSR1)`` for a soft stop, which waits for connections and logs
    "Proxy <name> stopped (cumulated conns: ...)" at level warning for every proxy.
    """

    name = "haproxy"

    def __init__(
        self,
        tmpdir: Path | str,
        cfg_text: str,
        *,
        port: int | None = None,
        start: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.proc = None
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.cfg_path = self.tmpdir / "haproxy.cfg"
        self.output_path = self.tmpdir / "haproxy.out"
        binds = _bind_addresses(cfg_text)
        for addr in binds:
            if not addr.startswith(_LOOPBACK):
                raise ValueError(f"haproxy test config binds {addr!r}: loopback only")
        if port is None and binds:
            port = int(binds[0].rsplit(":", 1)[1])
        self.port = port
        self.cfg_path.write_text(cfg_text if cfg_text.endswith("\n") else cfg_text + "\n")
        if start:
            self.start(timeout)

    def check_config(self) -> None:
        """``haproxy -c``: raise RuntimeError with HAProxy's messages on a config error."""
        _validate(
            [_exe("haproxy"), "-c", "-f", str(self.cfg_path)],
            f"haproxy -c rejected {self.cfg_path}",
            f"\n--- config ---\n{self.cfg_path.read_text()}",
        )

    def _accepts(self) -> bool:
        assert self.port is not None
        return port_listening(self.port)

    def start(self, timeout: float = 10.0) -> None:
        self.check_config()
        self._spawn([_exe("haproxy"), "-db", "-f", str(self.cfg_path)])
        if self.port is None:
            # Nothing to wait for without a port: `haproxy -c` above vetted the config.
            if not self.running():
                self._fail("exited early")
            return
        with contextlib.suppress(AssertionError):  # said below, with HAProxy's output
            wait_until(lambda: not self.running() or self._accepts(), timeout,
                       f"HAProxy accepting on 127.0.0.1:{self.port}")
        if not self.running():
            self._fail(f"exited early with code {self.proc.returncode if self.proc else '?'}")
        if not self._accepts():
            self._fail(f"port 127.0.0.1:{self.port} not accepting within {timeout} s")

    def __enter__(self) -> HaproxyProcess:
        return self


def http_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    """One ``GET path HTTP/1.1`` to 127.0.0.1:port over a raw socket (Connection: close).

    Returns the whole response. A raw socket rather than urllib: no proxy environment
    variables, no keep-alive, one connection (hence one HAProxy log line) per request.
    """
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    ).encode()
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


# --------------------------------------------------------------------------- shipped example

# Lines of config/haproxy/haproxy-log-direct.cfg that haproxy_direct_cfg() rewrites.
_EX_UDP_LINE = "    log 192.0.2.10:1514 len 8192 format rfc5424 local0\n"
_EX_RING_LINE = "    #log ring@haproxy-forwarder local0\n"
_EX_SERVER_LINE = "    server forwarder 192.0.2.10:1514 log-proto octet-count\n"
_EX_BIND = "    bind :80\n"
_EX_BACKEND_SERVER = "server app1 192.0.2.20:8080"


def haproxy_direct_cfg(
    transport: Literal["udp", "ring"],
    log_port: int,
    http_port: int,
    *,
    udp_format: str = "rfc5424",
) -> str:
    """The SHIPPED config/haproxy/haproxy-log-direct.cfg, made runnable on loopback.

    ``transport``: "udp" keeps snippet A (the UDP ``log`` line) with the forwarder at
    127.0.0.1:``log_port`` and ``format <udp_format>`` ("rfc5424" as shipped, or "local",
    "rfc3164"); "ring" comments A out and enables B (the ring with ``log-proto
    octet-count``) with its server at 127.0.0.1:``log_port``. The frontend ``www`` binds
    127.0.0.1:``http_port`` and the backend ``app`` answers 200 "ok" itself
    (``http-request return``) instead of proxying to a real server. Everything else
    (``log-send-hostname``, ``log-format-sd``, ``option httplog``, the ring) is as shipped.
    """
    text = HAPROXY_EXAMPLE.read_text()
    for needle in (_EX_UDP_LINE, _EX_RING_LINE, _EX_SERVER_LINE, _EX_BIND, _EX_BACKEND_SERVER):
        if needle not in text:
            raise AssertionError(f"{HAPROXY_EXAMPLE} changed: {needle!r} not found")
    if transport == "udp":
        udp = _EX_UDP_LINE.replace("192.0.2.10:1514", f"127.0.0.1:{log_port}")
        text = text.replace(_EX_UDP_LINE, udp.replace("format rfc5424", f"format {udp_format}"))
    else:
        text = text.replace(_EX_UDP_LINE, "    #" + _EX_UDP_LINE.lstrip())
        text = text.replace(_EX_RING_LINE, _EX_RING_LINE.replace("#", ""))
        text = text.replace(
            _EX_SERVER_LINE, _EX_SERVER_LINE.replace("192.0.2.10:1514", f"127.0.0.1:{log_port}")
        )
    text = text.replace(_EX_BIND, f"    bind 127.0.0.1:{http_port}\n")
    # no real backend: the backend answers by itself
    return text.replace(
        _EX_BACKEND_SERVER, "http-request return status 200 content-type text/plain string ok"
    )


def haproxy_cfg(port: int, global_log: str, *, extra_global: str = "", sections: str = "") -> str:
    """A minimal HTTP frontend `fe` on 127.0.0.1:port answering 200 "ok" by itself."""
    return f"""global
    {global_log}
{extra_global}
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 5s
    timeout server 5s

frontend fe
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string ok
{sections}
"""


# --------------------------------------------------------------------------- RELP (omrelp)

RSYSLOG_RULE_RELP = REPO_ROOT / "config" / "rsyslog" / "haproxy-forwarder-relp.conf"
# The RELP rule's port (the forwarder's listen.relp example), where the TCP rules have 1514.
RULE_RELP_PORT = 'port="2514"'


class RelpRsyslogProcess(RsyslogProcess):
    """``RsyslogProcess`` with the SHIPPED omrelp rule (config/rsyslog/haproxy-forwarder-relp.conf,
    Debian package rsyslog-relp): its port placeholder is put where RsyslogProcess looks for
    it, then everything (target, port, local file, ``substitutions``, ``extra_config``) is
    as for the TCP rules."""

    def __init__(self, tmpdir: Path | str, forward_host: str, forward_port: int,
                 shipped_rule: Path = RSYSLOG_RULE_RELP, **kwargs: object) -> None:
        tmp = Path(tmpdir)
        tmp.mkdir(parents=True, exist_ok=True)
        shipped = shipped_rule.read_text()
        source = tmp / "relp-rule.shipped.conf"
        source.write_text(_substitute(shipped, RULE_RELP_PORT, RULE_PORT, "relp port",
                                      shipped_rule))
        super().__init__(tmp, forward_host, forward_port, rule_file=source,
                         **kwargs)  # type: ignore[arg-type]


def imptcp_input(port: int) -> str:
    """RainerScript for ``extra_config``: a plain TCP syslog input on 127.0.0.1:port (LF
    framing), through the default ruleset like the unix socket: a sender that a full rsyslog
    queue slows down instead of dropping its datagrams."""
    return (f'module(load="imptcp")\n'
            f'input(type="imptcp" address="127.0.0.1" port="{port}")\n')


# The RELP-over-TLS rule (omrelp tls="on"): same placeholders as the RELP rule.
RSYSLOG_RULE_RELP_TLS = REPO_ROOT / "config" / "rsyslog" / "haproxy-forwarder-relp-tls.conf"


class RelpTlsRsyslogProcess(RelpRsyslogProcess):
    """``RelpRsyslogProcess`` with the shipped RELP-over-TLS rule
    (config/rsyslog/haproxy-forwarder-relp-tls.conf). Its certificate paths
    (/etc/rsyslog.d/haproxy-forwarder-tls/) become ``certs_dir``, which must hold ca.pem,
    client.pem and client.key; ``tlslib`` ("openssl", "gnutls") replaces the rule's
    tls.tlslib."""

    def __init__(self, tmpdir: Path | str, forward_host: str, forward_port: int,
                 certs_dir: Path, tlslib: str = "openssl", **kwargs: object) -> None:
        subs = dict(kwargs.pop("substitutions", None) or {})  # type: ignore[call-overload]
        subs["/etc/rsyslog.d/haproxy-forwarder-tls/"] = f"{certs_dir}/"
        subs['tls.tlslib="openssl"'] = f'tls.tlslib="{tlslib}"'
        super().__init__(tmpdir, forward_host, forward_port, substitutions=subs,
                         shipped_rule=RSYSLOG_RULE_RELP_TLS, **kwargs)
