"""Fail the package build when debian/changelog and the project disagree on the version."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

root = Path(__file__).resolve().parents[1]
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
init = (root / "haproxy_forwarder" / "__init__.py").read_text()
match = re.search(r'^__version__ = "([^"]+)"', init, re.M)
module = match.group(1) if match else None
package = subprocess.run(["dpkg-parsechangelog", "-l", str(root / "debian" / "changelog"),
                          "-SVersion"], check=True, capture_output=True, text=True).stdout.strip()
upstream = package.split(":", 1)[-1].rsplit("-", 1)[0] if "-" in package else package
if not project == module == upstream:
    sys.exit(f"version mismatch: pyproject.toml {project}, haproxy_forwarder.__version__ "
             f"{module}, debian/changelog {package}: add a changelog entry (dch -v {project})")
print(f"version {package}")
