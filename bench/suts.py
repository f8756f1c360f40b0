"""Systems under test: haproxy-forwarder (through its CLI and a TOML config, as users run it)
and syslog-ng 3.38 from Debian (extracted with apt-get download + dpkg -x, run from a folder).
rsyslog as Sekoia's concentrator is in bench/concentrator.py (it uses extract_debs too)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from devtools import REPO
from devtools.daemon import Daemon
from devtools.keys import INTAKE_KEY as KEY

from . import procs
from .control import Intake

CACHE = REPO / ".bench-cache"

#: How the forwarder picks its implementations: extra environment per name. "python" forces
#: the pure-Python reference wherever a compiled one exists (the aiohttp-style switch); the
#: daemon ignores the variable until a compiled core ships, so both then measure the same.
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "default": {},
    "python": {"HAPROXY_FORWARDER_NO_EXTENSIONS": "1"},
}


def _settings_fields() -> set[str]:
    from haproxy_forwarder.config import Settings

    return set(Settings.model_fields)


class Forwarder(Daemon):
    """One daemon process; defaults except what a benchmark needs (loopback, spool dir).

    Nothing from this shell's HAPROXY_FORWARDER_* variables reaches it; `impl` picks the
    implementations through IMPLEMENTATIONS.
    """

    def __init__(self, tmp: Path, intake: Intake, spool_mode: str = "overflow",
                 spool_dir: Path | None = None, extra: dict[str, dict[str, Any]] | None = None,
                 impl: str = "default", label: str = "") -> None:
        self.name = label or "haproxy-forwarder"
        self.impl = impl
        self.spool_dir = spool_dir or tmp / f"spool-{time.monotonic_ns()}"
        cfg: dict[str, Any] = {
            "shutdown_timeout": 5.0,
            "listen": {"tcp": ["127.0.0.1:0"], "udp": []},
            "intake": {"url": intake.url, "key": KEY, "ca_file": str(intake.ca_file)},
            "spool": {"dir": str(self.spool_dir), "mode": spool_mode},
            "log": {"format": "json", "level": "info"},
        }
        if "status" in _settings_fields():
            # the status endpoint (newer versions) must not collide with a running daemon
            cfg["status"] = {"listen": "127.0.0.1:0"}
        for section, values in (extra or {}).items():
            cfg.setdefault(section, {}).update(values)
        super().__init__(tmp, cfg, env=IMPLEMENTATIONS[impl], file_prefix="forwarder",
                         config_path=tmp / f"forwarder-{time.monotonic_ns()}.toml",
                         isolate_env=True, spawn=procs.spawn)

    @property
    def port(self) -> int:
        return self.tcp_port

    def start(self, timeout: float = 30.0, poll: float = 0.01) -> Forwarder:
        # A short poll: the replay figure counts from the moment "started" is seen.
        super().start(timeout, poll)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        # procs.stop kills the whole process group if the signal is not enough.
        rc = procs.stop(self.proc, sig, timeout) if self.proc is not None else 0
        self.close_files()
        return rc

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("level") in ("error", "critical", "warning")
                and r.get("event") not in ("backpressure_on",)]


# -- syslog-ng ------------------------------------------------------------------------------

SNG_PACKAGES = ("syslog-ng-core", "syslog-ng-mod-http")
SNG_DIR = CACHE / "syslog-ng"
SNG_ROOT = SNG_DIR / "root"


class SyslogNgUnavailable(Exception):
    pass


def _run(args: list[str], timeout: float = 180.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def _triplet() -> str:
    """The multiarch triplet of this machine (x86_64-linux-gnu if dpkg cannot say)."""
    try:
        triplet = _run(["dpkg-architecture", "-qDEB_HOST_MULTIARCH"], 10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        triplet = ""
    return triplet or "x86_64-linux-gnu"


def lib_dirs(root: Path) -> list[Path]:
    """The library folders of a Debian tree rooted at `root` (an extraction, or /)."""
    triplets = ["x86_64-linux-gnu"]
    if _triplet() not in triplets:
        triplets.append(_triplet())
    return [root / d / t for t in triplets for d in ("usr/lib", "lib")]


def _sng_env() -> dict[str, str]:
    libs = [SNG_ROOT / "usr/lib/syslog-ng", *lib_dirs(SNG_ROOT)]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(str(p) for p in libs)
    return env


def _sng_binary() -> Path:
    return SNG_ROOT / "usr/sbin/syslog-ng"


def _module_path() -> Path:
    found = sorted((SNG_ROOT / "usr/lib/syslog-ng").glob("3.*"))
    if not found:
        raise SyslogNgUnavailable(f"no module folder under {SNG_ROOT}/usr/lib/syslog-ng")
    return found[-1]


def _missing_libs() -> list[str]:
    env = _sng_env()
    missing: set[str] = set()
    mp = _module_path()
    for f in [_sng_binary(), mp / "libafsocket.so", mp / "libhttp.so",
              mp / "libsyslogformat.so", mp / "libaffile.so"]:
        out = _run(["ldd", str(f)], 30, env=env).stdout
        missing |= {line.split()[0] for line in out.splitlines() if "not found" in line}
    return sorted(missing)


def _uninstalled_deps(packages: tuple[str, ...]) -> list[str]:
    """Direct dependencies of `packages` that dpkg does not have installed."""
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
                "--no-breaks", "--no-replaces", "--no-enhances", *packages], 60).stdout
    deps: set[str] = set()
    for line in out.splitlines():
        line = line.strip()
        if line.startswith(("Depends:", "|Depends:")):
            name = line.split(":", 1)[1].strip()
            if name.startswith("<") or name in packages:
                continue  # virtual package, or one of ours
            deps.add(name.split(":")[0])
    missing = []
    for name in sorted(deps):
        st = _run(["dpkg-query", "-W", "-f=${Status}", name], 30)
        if st.returncode != 0 or "install ok installed" not in st.stdout:
            missing.append(name)
    return missing


#: Dependencies never extracted: init-system glue, nothing a foreground daemon loads.
SKIP_DEPS = ("lsb-base", "sysvinit-utils", "libelogind0", "init-system-helpers", "adduser",
             "logrotate")


def extract_debs(packages: tuple[str, ...], folder: Path, log: Any,
                 error: type[Exception]) -> dict[str, Any]:
    """Debian's `packages` and their uninstalled dependencies, extracted (apt-get download +
    dpkg -x, no root needed) into folder/root once; raises `error` when that cannot be done."""
    info: dict[str, Any] = {}
    root = folder / "root"
    debs = folder / "debs"
    if not root.exists():
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise error(f"apt-get/dpkg not found: {' '.join(packages)} are taken from Debian")
        debs.mkdir(parents=True, exist_ok=True)
        try:
            extra = [d for d in _uninstalled_deps(packages) if d not in SKIP_DEPS]
        except (OSError, subprocess.SubprocessError) as exc:
            raise error(f"apt-cache depends failed: {exc}") from exc
        wanted = [*packages, *extra]
        log(f"  extracting from Debian: apt-get download {' '.join(wanted)}")
        r = _run(["apt-get", "download", *wanted], 300, cwd=debs)
        if r.returncode != 0 and "Unable to locate" in r.stderr + r.stdout:
            log("  package lists missing: apt-get update")
            _run(["apt-get", "update", "-qq"], 300)
            r = _run(["apt-get", "download", *wanted], 300, cwd=debs)
        if r.returncode != 0:
            raise error(f"apt-get download {' '.join(wanted)} failed: "
                        f"{(r.stderr or r.stdout).strip()[-500:]}")
        root_tmp = folder / "root.tmp"
        shutil.rmtree(root_tmp, ignore_errors=True)
        for deb in sorted(debs.glob("*.deb")):
            x = _run(["dpkg", "-x", str(deb), str(root_tmp)], 120)
            if x.returncode != 0:
                raise error(f"dpkg -x {deb.name} failed: {x.stderr.strip()}")
        root_tmp.rename(root)
        info["extracted_dependencies"] = extra
    info["debs"] = sorted(p.name for p in debs.glob("*.deb"))
    return info


def ensure_syslog_ng(log: Any = print) -> tuple[str, dict[str, Any]]:
    """Extract syslog-ng (and its uninstalled dependencies) into .bench-cache; its version."""
    info = extract_debs(SNG_PACKAGES, SNG_DIR, log, SyslogNgUnavailable)
    missing = _missing_libs()
    if missing:
        raise SyslogNgUnavailable(
            f"shared libraries not found for syslog-ng even with LD_LIBRARY_PATH: "
            f"{', '.join(missing)}")
    v = _run([str(_sng_binary()), "--version"], 30, env=_sng_env())
    if v.returncode != 0:
        raise SyslogNgUnavailable(f"syslog-ng --version failed: {v.stderr.strip()[-500:]}")
    version = v.stdout.splitlines()[0] if v.stdout else "?"
    return version, info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[1] == want and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


SNG_CONF = """@version: 3.38
# As a peer would run it in front of the Sekoia intake: syslog() TCP source (octet counting),
# program prefix filter, http() batches to /plain/batch, TLS verified against the CA,
# flow-control end to end.  Source windows sized for a high-rate sender.
options {{
  threaded(yes);
  use-dns(no);
  dns-cache(no);
  keep-hostname(yes);
  chain-hostnames(no);
  stats-freq(0);
  log-msg-size(262144);
}};

source s_haproxy {{
  syslog(ip("127.0.0.1") port({port}) transport("tcp")
         max-connections(16) log-iw-size({iw}) log-fetch-limit({fetch}));
}};

filter f_haproxy {{ program("haproxy" type(string) flags(prefix)); }};

destination d_sekoia {{
  http(
    url("{url}/plain/batch")
    method("POST")
    headers("X-SEKOIAIO-INTAKE-KEY: {key}", "Content-Type: text/plain")
    body("$MSG")
    batch-lines(1000)
    workers(2)
    tls(ca-file("{ca}") peer-verify(yes))
  );
}};

log {{ source(s_haproxy); filter(f_haproxy); destination(d_sekoia); flags(flow-control); }};

source s_internal {{ internal(); }};
destination d_internal {{ file("{tmp}/syslog-ng-internal.log"); }};
log {{ source(s_internal); destination(d_internal); }};
"""


class SyslogNg:
    name = "syslog-ng"

    def __init__(self, tmp: Path, intake: Intake, iw: int = 20000, fetch: int = 1000) -> None:
        self.tmp = tmp / f"sng-{time.monotonic_ns()}"
        self.tmp.mkdir(parents=True)
        self.port = free_port()
        self.conf = SNG_CONF.format(port=self.port, url=intake.url, key=KEY, ca=intake.ca_file,
                                    tmp=self.tmp, iw=iw, fetch=fetch)
        self.conf_path = self.tmp / "syslog-ng.conf"
        self.conf_path.write_text(self.conf)
        self.proc: subprocess.Popen[bytes] | None = None
        self.t_started = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def args(self) -> list[str]:
        return [str(_sng_binary()), "-F", "--no-caps", "-f", str(self.conf_path),
                f"--module-path={_module_path()}", "-R", str(self.tmp / "persist"),
                "-p", str(self.tmp / "pid"), "-c", str(self.tmp / "ctl")]

    def syntax_check(self) -> str | None:
        r = _run([*self.args(), "--syntax-only"], 30, env=_sng_env())
        return None if r.returncode == 0 else (r.stderr or r.stdout).strip()[-1500:]

    def start(self, timeout: float = 30.0) -> SyslogNg:
        self._out = (self.tmp / "stderr.log").open("wb")
        self.proc = proc = procs.spawn(self.args(), stdout=self._out, stderr=subprocess.STDOUT,
                                       env=_sng_env())
        if not procs.wait_until(lambda: listening(self.port) or proc.poll() is not None,
                                timeout, 0.01) or proc.poll() is not None:
            raise RuntimeError(f"syslog-ng did not start: {self.stderr()[-1500:]}")
        self.t_started = time.monotonic()
        return self

    def stderr(self) -> str:
        p = self.tmp / "stderr.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def internal_log(self) -> str:
        p = self.tmp / "syslog-ng-internal.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> int:
        rc = procs.stop(self.proc) if self.proc is not None else 0
        self._out.close()
        return rc
