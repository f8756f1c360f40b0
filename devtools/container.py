"""The container image with podman, for tests/test_container.py and .ci/prepare-podman.

No image registry needs to be reachable: the base image is made here from a Debian tree
(`debootstrap --variant=minbase bookworm`, with python3, its headers, pip and venv), imported
with `podman import`, and the image is built from it (`--build-arg BASE=...`). What it needs:

- `podman` and `runc` (Debian packages), as root, with the containers.conf of `CONTAINERS_CONF`
  below (host network, runc, cgroupfs, bounded ulimits: what works on a CI VM without systemd);
- `debootstrap` and a Debian mirror (`FORWARDER_TEST_DEBIAN_MIRROR`, default deb.debian.org)
  the first time only, and PyPI for pip inside the build (its CA: `PIP_CERT` of this process,
  mounted into the build, as docs/container.md says for TLS-inspecting proxies).

Cached, so only the first run pays (`FORWARDER_TEST_CACHE`, default
/var/cache/haproxy-forwarder-tests):
- the debootstrap tree in CACHE/bookworm-base, kept with a `.recipe` marker (its recipe's hash);
- the base image in podman's store as BASE_IMAGE, labelled with the same hash;
- the forwarder image as IMAGE_REPO:<key>, the key a hash of the Dockerfile, .dockerignore,
  the files of the build context (CONTEXT_PATHS, as .dockerignore lets them in), the base
  image's id and the build arguments: any change to what goes into the image builds it again,
  and an unchanged tree reuses it (between tests, and between runs).

`python3 -m devtools.container prepare [--image]` (stdlib only: CI runs it before the venv
exists) makes the conf and the base image, and with --image the image too; `clean` removes
the test images, containers and volumes (not the cached tree).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import REPO

SUITE = "bookworm"
MIRROR = os.environ.get("FORWARDER_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
INCLUDE = ("python3", "python3-dev", "python3-pip", "python3-venv", "python-is-python3",
           "ca-certificates")
#: Bump when the way the base is made changes (not only its package list): rebuilds it.
BASE_RECIPE_VERSION = 1
BASE_IMAGE = f"localhost/haproxy-forwarder-test-base:{SUITE}"
IMAGE_REPO = "localhost/haproxy-forwarder-test"
BUILD_STAGE_REPO = "localhost/haproxy-forwarder-test-build"
RECIPE_LABEL = "org.haproxy-forwarder.test-base-recipe"
#: Containers and volumes made by these helpers carry it (value: the run's id), for cleanup.
TEST_LABEL = "org.haproxy-forwarder.test"
#: The spool inside the image (VOLUME of the Dockerfile, spool.dir of the shipped config).
SPOOL_DIR = "/var/lib/haproxy-forwarder"
UID = 10514

#: What the build context holds (.dockerignore lets in exactly these, minus build products).
CONTEXT_PATHS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE",
                 "haproxy_forwarder", "config/haproxy-forwarder.toml")
_CONTEXT_SKIP_SUFFIXES = (".pyc", ".pyo", ".pyd", ".so", ".c", ".html")

CONTAINERS_CONF_TEXT = """\
# Written by devtools/container.py for the container tests (podman as root on a CI VM with no
# systemd and no bridge networking): host network, runc, cgroupfs, bounded ulimits.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
netns = "host"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""

RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
_counter = itertools.count(1)


def cache_dir() -> Path:
    """FORWARDER_TEST_CACHE, /var/cache/haproxy-forwarder-tests as root, else ~/.cache/..."""
    chosen = os.environ.get("FORWARDER_TEST_CACHE")
    if chosen:
        return Path(chosen)
    if os.geteuid() == 0:
        return Path("/var/cache/haproxy-forwarder-tests")
    return Path.home() / ".cache" / "haproxy-forwarder-tests"


def base_tree() -> Path:
    return cache_dir() / f"{SUITE}-base"


def _say(msg: str) -> None:
    print(f"[container] {msg}", file=sys.stderr, flush=True)


# -- podman and its configuration ----------------------------------------------------------


def containers_conf() -> Path:
    """The containers.conf the helpers point podman at (written if missing or different)."""
    path = cache_dir() / "containers.conf"
    if not path.exists() or path.read_text() != CONTAINERS_CONF_TEXT:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(CONTAINERS_CONF_TEXT)
        tmp.replace(path)
    return path


def podman_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf()), **(extra or {})}


def podman(*args: str, check: bool = True,
           timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`podman ARGS` with our containers.conf; CalledProcessError (with its output) if `check`."""
    proc = subprocess.run(["podman", *args], env=podman_env(), capture_output=True,
                          timeout=timeout, text=True)
    if check and proc.returncode != 0:
        raise PodmanError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


class PodmanError(subprocess.CalledProcessError):
    """A podman command failed: its message ends with what podman said."""

    def __str__(self) -> str:
        said = str(self.stderr or "").strip()
        return f"{super().__str__()}\n{said[-3000:]}"


def podman_problem() -> str | None:
    """Why podman cannot run the image tests here (one line), or None."""
    for tool, package in (("podman", "podman"), ("runc", "runc")):
        if shutil.which(tool) is None:
            return f"{tool} not found: the container tests need Debian's {package} (as root)"
    if os.geteuid() != 0:
        return "not root: the container tests run podman as root (and debootstrap for the base)"
    try:
        proc = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman info failed: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"podman info failed: {last}"
    return None


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def image_inspect(name: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(podman("image", "inspect", name).stdout)
    return data[0]


# -- the base image (debootstrap) ----------------------------------------------------------


def base_recipe() -> str:
    """The hash naming how the base is made: the suite, the packages, this code's version."""
    text = json.dumps({"suite": SUITE, "include": sorted(INCLUDE), "variant": "minbase",
                       "version": BASE_RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_ready() -> bool:
    if not image_exists(BASE_IMAGE):
        return False
    labels = image_inspect(BASE_IMAGE).get("Labels") or {}
    return bool(labels.get(RECIPE_LABEL) == base_recipe())


def _tree_ready(tree: Path) -> bool:
    marker = tree / ".recipe"
    return marker.is_file() and marker.read_text().strip() == base_recipe()


def base_problem() -> str | None:
    """Why the base image cannot be had (one line), or None (ready, or can be made)."""
    if base_ready() or _tree_ready(base_tree()):
        return None
    if shutil.which("debootstrap") is None:
        return ("debootstrap not found: the container tests make their base image with "
                "Debian's debootstrap (no image registry is used)")
    url = f"{MIRROR}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15):
            pass
    except OSError as exc:
        return f"Debian mirror {MIRROR} unreachable ({exc}): the base image is made from it"
    return None


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One preparer at a time (pytest workers, CI, a developer's second terminal)."""
    path = cache_dir() / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _debootstrap(tree: Path) -> None:
    """A fresh tree in `tree` (made beside it, renamed into place when complete)."""
    work = tree.with_name(f"{tree.name}.tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    _say(f"debootstrap {SUITE} into {work} (about a minute, once)")
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE,
         str(work), MIRROR], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    # As the official python images: pip may install into the system Python (PEP 668 marker
    # removed); no downloaded packages or indexes in the image (the build runs apt-get update).
    for marker in work.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    for deb in (work / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    lists = work / "var/lib/apt/lists"
    for entry in lists.iterdir() if lists.is_dir() else ():
        if entry.is_file():
            entry.unlink()
    (work / ".recipe").write_text(base_recipe() + "\n")
    shutil.rmtree(tree, ignore_errors=True)
    work.rename(tree)
    _say(f"debootstrap done in {time.monotonic() - t0:.0f} s")


def ensure_base() -> str:
    """BASE_IMAGE in podman's store, made (from the cached tree, or debootstrap) if missing."""
    if base_ready():
        return BASE_IMAGE
    with _locked("podman-base"):
        if base_ready():
            return BASE_IMAGE
        tree = base_tree()
        if not _tree_ready(tree):
            _debootstrap(tree)
        t0 = time.monotonic()
        # The marker is the tree's, not the image's: left out of the tar.
        tar = subprocess.Popen(["tar", "-C", str(tree), "--exclude=./.recipe", "-c", "."],
                               stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["podman", "import",
                 "--change", "ENV LANG=C.UTF-8",
                 "--change", 'CMD ["python3"]',
                 "--change", f"LABEL {RECIPE_LABEL}={base_recipe()}",
                 "-", BASE_IMAGE],
                stdin=tar.stdout, env=podman_env(), capture_output=True, text=True,
                timeout=600)
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"podman import failed: {imported.stderr[-3000:]}")
        _say(f"base image {BASE_IMAGE} imported in {time.monotonic() - t0:.0f} s")
    return BASE_IMAGE


# -- the forwarder image -------------------------------------------------------------------


def package_version() -> str:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return str(data["project"]["version"])


def _context_files() -> list[Path]:
    out: list[Path] = []
    for rel in CONTEXT_PATHS:
        path = REPO / rel
        if path.is_file():
            out.append(path)
            continue
        for sub in sorted(path.rglob("*")):
            if (sub.is_file() and "__pycache__" not in sub.parts
                    and not sub.name.endswith(_CONTEXT_SKIP_SUFFIXES)):
                out.append(sub)
    return sorted(out)


def build_args(base: str) -> dict[str, str]:
    args = {"BASE": base, "VERSION": package_version()}
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=False)
    if rev.returncode == 0:
        args["REVISION"] = rev.stdout.strip()
    return args


def image_key(base: str, args: Mapping[str, str]) -> str:
    """A hash of what goes into the image: the build files, the context, the base, the args.

    The REVISION argument is left out (a commit that changes nothing in the image reuses it).
    """
    h = hashlib.sha256()
    for path in [REPO / "Dockerfile", REPO / ".dockerignore", *_context_files()]:
        h.update(str(path.relative_to(REPO)).encode() + b"\0")
        h.update(oct(path.stat().st_mode & 0o777).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    h.update(str(image_inspect(base)["Id"]).encode())
    h.update(json.dumps({k: v for k, v in args.items() if k != "REVISION"},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass
class Built:
    """The image the tests run: its name, and whether this call built it (with the time)."""

    name: str
    built: bool
    seconds: float
    log: str = ""


def _ca_secret() -> list[str]:
    """pip in the build trusts this machine's CA bundle (PIP_CERT, else the system one): the
    Dockerfile's build-ca secret, as docs/container.md tells users behind a TLS proxy."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return ["--secret", f"id=build-ca,src={Path(candidate).resolve()}"]
    return []


def ensure_image(timeout: float = 1200.0) -> Built:
    """The forwarder image for this tree, built on the base if no image has its key yet."""
    base = ensure_base()
    args = build_args(base)
    name = f"{IMAGE_REPO}:{image_key(base, args)}"
    if image_exists(name):
        return Built(name, built=False, seconds=0.0)
    with _locked("podman-image"):
        if image_exists(name):
            return Built(name, built=False, seconds=0.0)
        t0 = time.monotonic()
        _say(f"building {name} on {base}")
        cmd = ["build", "--format", "docker", "--network", "host", "--pull=never",
               *_ca_secret(), "--label", f"{TEST_LABEL}=image"]
        for key, value in args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        proc = podman(*cmd, "-t", name, str(REPO), check=False, timeout=timeout)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"podman build failed ({proc.returncode}) after {seconds:.0f} s:"
                               f"\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
        _say(f"built {name} in {seconds:.0f} s")
        # Its build stage tagged too: the layers a rebuild starts from stay, and the previous
        # build's go with its tag instead of piling up untagged.
        stage = f"{BUILD_STAGE_REPO}:{name.rsplit(':', 1)[1]}"
        stage_id = _first_stage_id(proc.stdout)
        if stage_id is not None:
            podman("tag", stage_id, stage, check=False)
        _remove_other_images(keep=(name, stage))
        return Built(name, built=True, seconds=seconds, log=proc.stdout)


def _first_stage_id(output: str) -> str | None:
    """The image of the build stage, from `podman build`'s output: the last "--> ID" before
    the second stage starts."""
    found = None
    for line in output.splitlines():
        if line.startswith("[2/"):
            return found
        match = re.fullmatch(r"--> (?:Using cache )?([0-9a-f]{6,64})", line.strip())
        if match:
            found = match.group(1)
    return None


def _remove_other_images(keep: Sequence[str]) -> None:
    """Earlier test images (other keys) go: one forwarder image (and its build stage) stays."""
    for repo in (IMAGE_REPO, BUILD_STAGE_REPO):
        listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", repo, check=False)
        for ref in listed.stdout.split():
            if ref not in keep and ref.startswith(repo + ":"):
                podman("rmi", ref, check=False)


# -- containers and volumes ----------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"hf-test-{prefix}-{RUN_ID}-{next(_counter)}"


def volume(name: str | None = None) -> str:
    name = name or unique("spool")
    podman("volume", "create", "--label", f"{TEST_LABEL}={RUN_ID}", name)
    return name


def remove_volume(name: str) -> None:
    podman("volume", "rm", "-f", name, check=False)


@dataclass
class Container:
    """One `podman run -d` of an image on the host network, its JSON logs readable."""

    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Sequence[str] = ()  # -v arguments: "SRC:DST[:OPTS]"
    args: Sequence[str] = ()  # after the image (the command; the image's CMD when empty)
    extra: Sequence[str] = ()  # more `podman run` options
    stop_timeout: int = 30
    name: str = field(default_factory=lambda: unique("run"))
    ports: dict[str, int] = field(default_factory=dict)

    def start(self) -> Container:
        cmd = ["run", "-d", "--name", self.name, "--network", "host",
               "--label", f"{TEST_LABEL}={RUN_ID}", "--stop-timeout", str(self.stop_timeout),
               # No systemd timer here: the tests run the image's HEALTHCHECK themselves.
               "--health-interval", "disable"]
        for key, value in self.env.items():
            cmd += ["-e", f"{key}={value}"]
        for mount in self.mounts:
            cmd += ["-v", mount]
        podman(*cmd, *self.extra, self.image, *self.args)
        return self

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (other lines skipped)."""
        out = []
        for line in self.logs().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]

    def state(self) -> dict[str, Any]:
        data = json.loads(podman("container", "inspect", self.name).stdout)
        state: dict[str, Any] = data[0]["State"]
        return state

    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def exit_code(self) -> int:
        return int(self.state()["ExitCode"])

    def wait_started(self, timeout: float = 60.0) -> Container:
        """Until the daemon logs "started" (its ports noted from "listening"); RuntimeError
        with its logs if it exits first or does not get there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.records()
            for rec in records:
                if rec.get("event") == "listening" and rec.get("proto") not in self.ports:
                    self.ports[str(rec.get("proto"))] = int(rec["port"])
            if any(rec.get("event") == "started" for rec in records):
                return self
            if not self.running():
                raise RuntimeError(f"container {self.name} exited {self.exit_code()}:\n"
                                   f"{self.logs()[-4000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"container {self.name}: no 'started' in {timeout:g} s:\n"
                           f"{self.logs()[-4000:]}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        proc = podman("wait", self.name, timeout=timeout)
        return int(proc.stdout.strip().splitlines()[-1])

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *cmd, check=check)

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """The image's HEALTHCHECK, run now: exit 0 healthy, 1 unhealthy."""
        return podman("healthcheck", "run", self.name, check=False, timeout=60)

    def stop(self, timeout: float | None = None) -> int:
        """`podman stop`: the image's STOPSIGNAL (SIGTERM), SIGKILL after the stop timeout.
        Returns the exit code."""
        t = self.stop_timeout if timeout is None else timeout
        podman("stop", "-t", str(int(t)), self.name, timeout=t + 60)
        return self.exit_code()

    def remove(self) -> None:
        """The container and its anonymous volumes (the image's VOLUME when nothing was
        mounted there)."""
        podman("rm", "-f", "-v", "-t", "0", self.name, check=False)

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def run_once(image: str, *args: str, options: Sequence[str] = (),
             timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`podman run` to completion (host network, no healthcheck timer), then removed with
    its anonymous volume (`--rm` keeps that one in podman 4.3). PodmanError if it fails."""
    name = unique("once")
    try:
        return podman("run", "--name", name, "--network", "host", "--label",
                      f"{TEST_LABEL}={RUN_ID}", "--health-interval", "disable", *options,
                      image, *args, timeout=timeout)
    finally:
        podman("rm", "-f", "-v", "-t", "0", name, check=False)


def cleanup(run_id: str | None = RUN_ID) -> None:
    """Containers and volumes of this run (every run's with None)."""
    label = TEST_LABEL if run_id is None else f"{TEST_LABEL}={run_id}"
    ids = podman("ps", "-aq", "--filter", f"label={label}", check=False).stdout.split()
    if ids:
        podman("rm", "-f", "-v", "-t", "0", *ids, check=False)
    vols = podman("volume", "ls", "-q", "--filter", f"label={label}", check=False).stdout.split()
    if vols:
        podman("volume", "rm", "-f", *vols, check=False)


# -- command line (CI) ---------------------------------------------------------------------

#: `prepare` exit status when this machine cannot run the tests (what they skip on).
CANNOT = 3


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m devtools.container", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="containers.conf and the base image (idempotent)")
    prep.add_argument("--image", action="store_true", help="build the forwarder image too")
    sub.add_parser("clean", help="remove the test images, containers and volumes")
    args = p.parse_args(argv)
    if args.command == "clean":
        cleanup(None)
        for repo in (IMAGE_REPO, BUILD_STAGE_REPO):
            for ref in podman("images", "--format", "{{.Repository}}:{{.Tag}}", repo,
                              check=False).stdout.split():
                podman("rmi", "-f", ref, check=False)
        return 0
    problem = podman_problem() or base_problem()
    if problem is not None:
        # Not a failure: the tests skip for the same reason, with the same line.
        print(f"cannot prepare (tests/test_container.py will skip): {problem}",
              file=sys.stderr)
        return CANNOT
    t0 = time.monotonic()
    print(f"containers.conf: {containers_conf()}")
    print(f"base image: {ensure_base()} ({time.monotonic() - t0:.0f} s)")
    if args.image:
        built = ensure_image()
        how = f"built in {built.seconds:.0f} s" if built.built else "reused"
        print(f"image: {built.name} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
