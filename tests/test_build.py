"""The build: compiled modules in the installed package, the sdist's sources, the optional compile
(no compiler, HAPROXY_FORWARDER_NO_EXTENSIONS=1), and the Dockerfile's two stages done by hand."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

import haproxy_forwarder
from devtools.daemon import Daemon, base_config
from devtools.probe import wait_until

REPO = Path(__file__).resolve().parents[1]
SOURCE_PKG = REPO / "haproxy_forwarder"
INSTALLED_PKG = Path(haproxy_forwarder.__file__).resolve().parent
EXPECT_COMPILED = os.environ.get("HAPROXY_FORWARDER_EXPECT_COMPILED") == "1"
NO_EXTENSIONS = "HAPROXY_FORWARDER_NO_EXTENSIONS"
CYTHON_SUFFIXES = (".pyx", ".pxi", ".pxd")
PROJECT_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md")
# Two cores, gcc -O3 on the real modules, a venv made and filled from the package index.
BUILD_TIMEOUT = 240


def pyx_modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts) for p in SOURCE_PKG.rglob("*.pyx"))


def extension_file(module: str, package_dir: Path = INSTALLED_PKG) -> Path | None:
    parts = module.split(".")[1:]
    base = package_dir.joinpath(*parts)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if base.with_name(base.name + suffix).exists():
            return base.with_name(base.name + suffix)
    return None


def clean_env(**extra: str) -> dict[str, str]:
    # The build reads only these variables of ours; the caller's choice must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAPROXY_FORWARDER_")}
    return {**env, **extra}


def project_copy(dst: Path, keep_pyx: bool = True) -> Path:
    """The files a build sees (what the Dockerfile copies), without the tree's build products."""
    dst.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy2(REPO / name, dst / name)
    ignore = ["__pycache__", "*.so", "*.c", "*.html"]
    if not keep_pyx:
        ignore += ["*.pyx", "*.pxi", "*.pxd"]
    shutil.copytree(SOURCE_PKG, dst / "haproxy_forwarder", ignore=shutil.ignore_patterns(*ignore))
    return dst


PROBE_PXI = """
cdef inline Py_ssize_t _count(const unsigned char* p, Py_ssize_t n, unsigned char c) noexcept nogil:
    cdef Py_ssize_t i, k = 0
    for i in range(n):
        if p[i] == c:
            k += 1
    return k
"""
PROBE_PYX = """
include "_probe.pxi"

def count_lf(bytes data):
    return _count(data, len(data), 10)
"""


def add_probe(src: Path, name: str = "_probe", pyx: str = PROBE_PYX) -> str:
    """A tiny module that includes a .pxi, as the real ones do: fast to compile."""
    ingest = src / "haproxy_forwarder" / "ingest"
    (ingest / "_probe.pxi").write_text(PROBE_PXI)
    (ingest / f"{name}.pyx").write_text(pyx)
    return f"haproxy_forwarder.ingest.{name}"


def setup_py(src: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "setup.py", *args], cwd=src, env=clean_env(**env),
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT)


# -- the installed package ------------------------------------------------------------------------


@pytest.mark.parametrize("module", pyx_modules() or [
    pytest.param("haproxy_forwarder.ingest._native", marks=pytest.mark.skip("no .pyx yet"))])
def test_compiled_module_imports_when_built(module: str) -> None:
    built = extension_file(module)
    if built is None:
        # `make test` expects every module compiled: a build that fell back must not pass.
        assert not EXPECT_COMPILED, f"{module} was not compiled into {INSTALLED_PKG}"
        pytest.skip(f"{module} is not compiled in this install")
    mod = importlib.import_module(module)
    assert Path(str(mod.__file__)).resolve() == built.resolve()


# -- the sdist ------------------------------------------------------------------------------------


def test_sdist_has_the_cython_sources_and_no_build_products(tmp_path: Path) -> None:
    src = project_copy(tmp_path / "src")
    add_probe(src)
    # What a developer's tree holds after building in place: it must stay out of the sdist.
    ingest = src / "haproxy_forwarder" / "ingest"
    (ingest / "_probe.c").write_text("/* generated */")
    (ingest / "_probe.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    r = setup_py(src, "-q", "sdist", "-d", str(tmp_path / "dist"))
    assert r.returncode == 0, r.stderr
    [sdist] = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {p.relative_to(src).as_posix() for p in (src / "haproxy_forwarder").rglob("*")
              if p.suffix in CYTHON_SUFFIXES}
    assert "haproxy_forwarder/ingest/_probe.pxi" in wanted
    assert wanted <= names, wanted - names
    assert {"setup.py", "pyproject.toml", "MANIFEST.in"} <= names
    assert not [n for n in names if n.endswith((".c", ".so", ".o"))]


# -- the optional compile --------------------------------------------------------------------------


def built_probe(src: Path, name: str = "_probe") -> bool:
    return extension_file(f"haproxy_forwarder.ingest.{name}", src / "haproxy_forwarder") is not None


def test_build_compiles_every_pyx_with_its_includes(tmp_path: Path) -> None:
    src = project_copy(tmp_path / "src", keep_pyx=False)
    module = add_probe(src)
    r = setup_py(src, "build_ext", "--inplace")
    assert r.returncode == 0, r.stderr
    assert built_probe(src) and "WITHOUT" not in r.stderr
    code = f"import {module} as m; print(m.count_lf(b'a\\nb\\n'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == "2", out.stderr
    # Generated C is a build product under build/, not beside the sources.
    assert not list((src / "haproxy_forwarder").rglob("*.c"))


def test_without_a_compiler_the_build_succeeds_pure_with_a_warning(tmp_path: Path) -> None:
    src = project_copy(tmp_path / "src", keep_pyx=False)
    add_probe(src)
    assert setup_py(src, "build_ext", "--inplace").returncode == 0 and built_probe(src)
    # Then the source changes and the compiler is gone: the module the earlier build left must
    # not pass for this one's. Newer than anything the build wrote, whatever the clock's grain.
    built = max(p.stat().st_mtime_ns for p in src.rglob("*") if p.is_file())
    add_probe(src, pyx=PROBE_PYX + "\ndef added():\n    return 1\n")
    for changed in (src / "haproxy_forwarder" / "ingest").glob("_probe.p*"):
        os.utime(changed, ns=(built + 10**9, built + 10**9))
    r = setup_py(src, "build_ext", "--inplace", CC="/bin/false", LDSHARED="/bin/false")
    assert r.returncode == 0, r.stderr
    assert not built_probe(src)
    assert "WITHOUT (some of) its compiled modules" in r.stderr
    assert "haproxy_forwarder.ingest._probe" in r.stderr  # which one, and (above) why


def test_a_pyx_that_does_not_translate_leaves_only_itself_out(tmp_path: Path) -> None:
    src = project_copy(tmp_path / "src", keep_pyx=False)
    add_probe(src)
    add_probe(src, "_broken", "def broken(:\n")
    r = setup_py(src, "build_ext", "--inplace")
    assert r.returncode == 0, r.stderr
    assert built_probe(src) and not built_probe(src, "_broken")
    assert "Cython could not translate haproxy_forwarder/ingest/_broken.pyx" in r.stderr


def test_no_extensions_at_install_time_compiles_nothing(tmp_path: Path) -> None:
    src = project_copy(tmp_path / "src", keep_pyx=False)
    add_probe(src)
    r = setup_py(src, "build_ext", "--inplace", **{NO_EXTENSIONS: "1"})
    assert r.returncode == 0, r.stderr
    assert not built_probe(src) and not (src / "build").exists()
    assert f"{NO_EXTENSIONS} is set" in r.stderr


# -- the Dockerfile's stages, by hand ------------------------------------------------------------


class InstalledDaemon(Daemon):
    """The daemon from another venv's entry point, run outside the repository (whose package
    would otherwise shadow the installed one)."""

    def __init__(self, tmp: Path, script: Path, env: dict[str, str]) -> None:
        self.script = script
        super().__init__(tmp, base_config(tmp), ["--dry-run"], env, isolate_env=True,
                         spawn=self._spawn)

    def command(self) -> list[str]:
        return [str(self.script), "--config", str(self.config_path), "run", *self.args]

    def _spawn(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw["cwd"] = self.tmp
        return subprocess.Popen(cmd, **kw)


def run(cmd: list[str | Path], cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=BUILD_TIMEOUT)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]} {r.stderr[-4000:]}"
    return r


@pytest.mark.timeout(2 * BUILD_TIMEOUT)
def test_wheel_built_with_a_compiler_runs_where_there_is_none(tmp_path: Path) -> None:
    # Stage 1: `pip wheel` (isolated build: setuptools + Cython from [build-system]).
    src = project_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, src],
        env=clean_env())
    [wheel] = wheels.glob("*.whl")
    # Stage 2: a new venv; nothing may compile (no sdist accepted, no compiler that works).
    venv = tmp_path / "runtime"
    run([sys.executable, "-m", "venv", venv])
    no_cc = clean_env(CC="/bin/false", LDSHARED="/bin/false")
    run([venv / "bin" / "pip", "install", "-q", "--only-binary=:all:", wheel], env=no_cc)
    version = run([venv / "bin" / "haproxy-forwarder", "--version"], cwd=tmp_path, env=no_cc)
    native = (SOURCE_PKG / "ingest" / "_native.pyx").exists()
    assert "gzip: isal" in version.stdout
    if native:
        assert "ingest: native" in version.stdout
    # The image's start: dry-run, loopback, one line through; refuses to start without native.
    env = {"HAPROXY_FORWARDER_EXPECT_COMPILED": "1"} if native else {}
    with InstalledDaemon(tmp_path, venv / "bin" / "haproxy-forwarder", env) as d:
        with socket.create_connection(("127.0.0.1", d.tcp_port)) as s:
            s.sendall(b"<134>Feb  6 12:14:14 lb1 haproxy[1]: from the wheel\n")
        wait_until(d.stdout_lines, 15, "the line on the installed daemon's stdout")
        assert [line["event"] for line in d.stdout_lines()] == ["from the wheel"]
        assert d.stop() == 0
