"""A copy of the project with its compiled modules built under sanitizers, and a runner for it.

    python -m devtools.sanitized build --kind asan|fuzz [--out DIR]
    python -m devtools.sanitized run --kind asan|fuzz [--out DIR] -- COMMAND...

`asan`: gcc with AddressSanitizer + UndefinedBehaviorSanitizer (`make asan` runs the ingest
suites with it). `fuzz`: clang with libFuzzer's coverage (-fsanitize=fuzzer-no-link) plus
ASan/UBSan, for atheris (`make fuzz`). The copy lives in DIR/tree (tests/ brings the
conformance corpus with it); the installed package (editable, unsanitized) is shadowed because
the tree is the working directory.
`run` refuses to start unless the sanitized module is the one Python imports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import REPO

COPY = ("haproxy_forwarder", "devtools", "tests", "bench", "fuzz", "pyproject.toml", "setup.py",
        "MANIFEST.in", "README.md")
IGNORE = shutil.ignore_patterns("__pycache__", "*.so", "*.c", "*.html", ".pytest_cache")
UB = "-fsanitize=address,undefined -fno-sanitize-recover=undefined"
FLAGS = {
    # -O1 keeps the reports' stacks readable; frame pointers give ASan full stack traces.
    "asan": ("gcc", f"{UB} -fno-omit-frame-pointer -g -O1"),
    "fuzz": ("clang", f"-fsanitize=fuzzer-no-link {UB} -fno-omit-frame-pointer -g -O1"),
}
# Python itself leaks by design at exit; everything else must stop the run at the first report.
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"


def default_out(kind: str) -> Path:
    return REPO / "build" / kind


def build(kind: str, out: Path) -> Path:
    cc, flags = FLAGS[kind]
    if shutil.which(cc) is None:
        raise SystemExit(f"{cc} not found: `apt-get install {cc}` (the {kind} build needs it)")
    tree = out / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=IGNORE)
        elif src.is_file():
            shutil.copy2(src, tree / name)
    env = {**os.environ, "CC": cc, "CFLAGS": flags, "LDSHARED": f"{cc} -shared {flags}"}
    env.pop("HAPROXY_FORWARDER_NO_EXTENSIONS", None)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                   env=env, check=True)
    # setup.py never fails a build (it falls back to pure Python): here a missing or
    # unsanitized module is an error.
    for pyx in sorted((tree / "haproxy_forwarder").rglob("*.pyx")):
        built = list(pyx.parent.glob(f"{pyx.stem}.*.so"))
        if not built:
            raise SystemExit(f"{pyx.relative_to(tree)} was not compiled: see the output above")
        symbols = subprocess.run(["nm", "-D", str(built[0])], capture_output=True, text=True,
                                 check=True).stdout
        if "__asan_" not in symbols:
            raise SystemExit(f"{built[0].name} has no ASan instrumentation")
    return tree


def runtime_env(kind: str) -> dict[str, str]:
    if kind == "asan":
        libs = [subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True,
                               text=True, check=True).stdout.strip()
                for lib in ("libasan.so", "libubsan.so")]
    else:
        import atheris

        libs = [str(Path(atheris.path()) / "asan_with_fuzzer.so")]
    return {
        "LD_PRELOAD": ":".join(libs),
        # Python's own allocator hides overflows inside its arenas from ASan.
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": ASAN_OPTIONS,
        "UBSAN_OPTIONS": UBSAN_OPTIONS,
        "HAPROXY_FORWARDER_EXPECT_COMPILED": "1",
    }


def run(kind: str, out: Path, command: list[str]) -> int:
    tree = out / "tree"
    if not tree.is_dir():
        raise SystemExit(f"no {kind} build in {out}: run `python -m devtools.sanitized build`")
    env = {**os.environ, **runtime_env(kind)}
    env.pop("HAPROXY_FORWARDER_NO_EXTENSIONS", None)
    where = subprocess.run(
        [sys.executable, "-c", "import haproxy_forwarder.ingest._native as m; print(m.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True)
    if where.returncode != 0 or not where.stdout.strip().startswith(str(tree)):
        raise SystemExit(f"the sanitized module is not the one imported: {where.stdout.strip()} "
                         f"{where.stderr.strip()[-2000:]}")
    print(f"[{kind}] {' '.join(f'{k}={v}' for k, v in runtime_env(kind).items())}", flush=True)
    return subprocess.run(command, cwd=tree, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.sanitized", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("build", "run"))
    ap.add_argument("--kind", choices=sorted(FLAGS), default="asan")
    ap.add_argument("--out", type=Path)
    argv = sys.argv[1:] if argv is None else argv
    # Everything after "--" is the command, options included (argparse would read them).
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = (args.out or default_out(args.kind)).resolve()
    if args.action == "build":
        print(f"[{args.kind}] sanitized build in {build(args.kind, out)}")
        return 0
    if not command:
        ap.error("run needs a command after --")
    return run(args.kind, out, command)


if __name__ == "__main__":
    sys.exit(main())
