"""Build script for the optional compiled modules: every haproxy_forwarder/**/*.pyx, via Cython.
Metadata lives in pyproject.toml; this file only decides whether extensions are built and turns a
failed build into the pure-Python install with a loud warning (the aiohttp / yarl convention).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
PACKAGE = "haproxy_forwarder"
# The same variable, and the same reading of it, as the run-time switch in ingest/__init__.py.
NO_EXTENSIONS_ENV = "HAPROXY_FORWARDER_NO_EXTENSIONS"

# Only the language level is set for every module.  Bounds and wraparound checks stay Cython's
# defaults unless a module's author turns them off in that module, where the explicit checks are.
DIRECTIVES: dict[str, Any] = {"language_level": "3"}
# Generated C goes under build/, not beside the .pyx: it is a build product, never package data.
CYTHON_BUILD_DIR = "build/cython"
# Modules left out at translation; kept here because setuptools may finalize build_ext again
# (editable installs do), on the extension list from which they were already removed.
_UNTRANSLATED: list[str] = []


def _disabled() -> bool:
    return os.environ.get(NO_EXTENSIONS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _banner(*lines: str) -> None:
    # stderr, boxed: pip shows it with -v, and a log reader cannot miss it.
    width = max(map(len, lines)) + 4
    out = ["*" * width, *(f"* {line.ljust(width - 4)} *" for line in lines), "*" * width]
    print("\n".join(out), file=sys.stderr, flush=True)


def _fallback(why: str) -> None:
    _banner(
        "WARNING: haproxy-forwarder is built WITHOUT (some of) its compiled modules.",
        f"Reason: {why}",
        "The pure-Python paths work, at several times the CPU per message.",
        "Needs: a C compiler (gcc) and the Python headers; Cython comes with the build.",
    )


def _extensions() -> list[Extension]:
    sources = sorted(HERE.glob(f"{PACKAGE}/**/*.pyx"))
    exts = []
    for path in sources:
        rel = path.relative_to(HERE)
        exts.append(Extension(".".join(rel.with_suffix("").parts), [rel.as_posix()]))
    return exts


class OptionalBuildExt(build_ext):
    """build_ext that cythonizes first and never fails the install: a module that does not
    build is left out, with a warning; the package imports the pure-Python path instead."""

    def finalize_options(self) -> None:
        exts = self.distribution.ext_modules
        # Before the base class: it annotates the Extension objects it is given, and cythonize
        # returns new ones (with the generated .c as their source).
        if exts:
            try:
                from Cython.Build import cythonize
            except ImportError as exc:
                _UNTRANSLATED.extend(ext.name for ext in exts)
                exts[:] = []
                _fallback(f"Cython is not importable in the build environment ({exc})")
            else:
                # One module at a time: a .pyx that does not translate leaves only itself out.
                translated = []
                for ext in exts:
                    try:
                        translated += cythonize(
                            [ext],
                            compiler_directives=DIRECTIVES,
                            build_dir=CYTHON_BUILD_DIR,
                            quiet=not self.verbose,
                        )
                    except Exception:  # Cython's CompileError; its messages are printed above
                        traceback.print_exc()
                        _UNTRANSLATED.append(ext.name)
                        _fallback(f"Cython could not translate {ext.sources[0]}")
                exts[:] = translated
        self.failed = list(_UNTRANSLATED)  # then also those that do not compile
        super().finalize_options()

    def run(self) -> None:
        # setuptools clears `inplace` while it builds (then copies the modules into the tree).
        self.in_tree = bool(self.inplace or getattr(self, "editable_mode", False))
        for name in self.failed:
            self._forget(name)
        super().run()
        if self.failed:
            _fallback(f"not built: {', '.join(self.failed)} (the error is above)")
        elif self.extensions:
            _banner(f"haproxy-forwarder: compiled {', '.join(e.name for e in self.extensions)}")

    def build_extensions(self) -> None:
        super().build_extensions()
        # Later steps (the in-place copy of an editable install, the wheel's file list) must
        # not look for what was not built.
        self.extensions = [ext for ext in self.extensions if ext.name not in self.failed]

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception:  # no compiler, missing headers, a C error: any of them means "pure"
            traceback.print_exc()
            self.failed.append(ext.name)
            self._forget(ext.name)

    def _forget(self, name: str) -> None:
        # A module built earlier would otherwise be packaged (from build/) or imported (in
        # place, editable) as if this build had made it: stale code that looks fine.
        Path(self.get_ext_fullpath(name)).unlink(missing_ok=True)
        if self.in_tree:
            (HERE / self.get_ext_filename(name)).unlink(missing_ok=True)


def main() -> None:
    if _disabled():
        _banner(f"{NO_EXTENSIONS_ENV} is set: building haproxy-forwarder without extensions")
        setup()
        return
    setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})


main()
