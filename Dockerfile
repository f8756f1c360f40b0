# haproxy-forwarder image (docs/container.md). Two stages from one base: the first compiles the
# Cython core with gcc into a virtualenv, the second copies that virtualenv and has no compiler.
#
#   podman build --format docker -t haproxy-forwarder .     (docker build -t haproxy-forwarder .)
#
# --format docker: podman's default OCI format has no HEALTHCHECK and drops it (with a warning).
# Behind a TLS-inspecting proxy, pip in the build stage must trust its CA (docs/container.md):
#   podman build --secret id=build-ca,src=/etc/ssl/certs/ca-certificates.crt ...
#   docker build --secret id=build-ca,src=/etc/ssl/certs/ca-certificates.crt ...
# (a PEM bundle that includes the proxy's CA; used by pip in the build, kept out of the image).
#
# BASE: any Debian-like image with python3 (>= 3.11) and its headers, the venv module, apt and
# useradd. The tests (tests/test_container.py) build on a Debian 12 base made with debootstrap.
ARG BASE=docker.io/library/python:3.11-slim

FROM ${BASE} AS build

# pip's index (a corporate mirror); the proxy variables (HTTPS_PROXY, NO_PROXY...) are build
# arguments of their own; its CA is the build-ca secret. Only this stage downloads anything.
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# gcc and the C library headers compile the Cython core (Python.h comes with the base).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md LICENSE ./
COPY haproxy_forwarder ./haproxy_forwarder

# The project's wheel (compiled here), then the virtualenv the image runs: the wheel and its
# dependencies. Then proof, outside /src, that every .pyx of the sources is a compiled module
# in the venv and imports: a build that fell back to pure Python fails here, not in production.
RUN --mount=type=secret,id=build-ca \
    if [ -f /run/secrets/build-ca ]; then export PIP_CERT=/run/secrets/build-ca; fi \
    && python3 -m venv /opt/haproxy-forwarder \
    && /opt/haproxy-forwarder/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/haproxy-forwarder/bin/pip install --prefer-binary /wheels/*.whl \
    && cd / \
    && /opt/haproxy-forwarder/bin/python -c "import importlib, pathlib; \
mods = ['.'.join(p.relative_to('/src').with_suffix('').parts) \
        for p in pathlib.Path('/src/haproxy_forwarder').rglob('*.pyx')]; \
assert mods, 'no .pyx under /src'; \
files = {m: importlib.import_module(m).__file__ for m in mods}; \
bad = {m: f for m, f in files.items() if not str(f).endswith('.so')}; \
assert not bad, f'not compiled: {bad}'; \
from haproxy_forwarder import ingest; \
assert ingest.IMPLEMENTATION == 'native', ingest.IMPORT_ERROR; \
print('compiled:', ', '.join(sorted(mods)))" \
    && /opt/haproxy-forwarder/bin/python -m pip uninstall -y -q pip setuptools wheel

FROM ${BASE}

# OCI labels: VERSION is the package's (tests check they agree), REVISION the commit built.
ARG VERSION=0.1.0
ARG REVISION=
ARG SOURCE=
LABEL org.opencontainers.image.title="haproxy-forwarder" \
      org.opencontainers.image.description="HAProxy syslog (TCP, UDP, TLS, RELP) to the Sekoia.io intake over HTTPS, with a disk spool" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

# A fixed numeric uid/gid (10514): volumes and key files are chowned to it, and orchestrators
# can check runAsNonRoot against USER. Its home is the spool (mode 0700: it holds log data).
RUN groupadd --system --gid 10514 haproxy-forwarder \
    && useradd --no-log-init --uid 10514 --gid 10514 --no-create-home \
        --home-dir /var/lib/haproxy-forwarder --shell /usr/sbin/nologin haproxy-forwarder \
    && install -d -m 0700 -o 10514 -g 10514 /var/lib/haproxy-forwarder \
    && install -d -m 0755 /etc/haproxy-forwarder /usr/share/doc/haproxy-forwarder

COPY --from=build /opt/haproxy-forwarder /opt/haproxy-forwarder
COPY config/haproxy-forwarder.toml /etc/haproxy-forwarder/config.toml
COPY LICENSE /usr/share/doc/haproxy-forwarder/LICENSE

ENV PATH=/opt/haproxy-forwarder/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    HAPROXY_FORWARDER_CONFIG=/etc/haproxy-forwarder/config.toml \
    HAPROXY_FORWARDER_LOG__FORMAT=json \
    HAPROXY_FORWARDER_EXPECT_COMPILED=1
# HAPROXY_FORWARDER_EXPECT_COMPILED=1: the image ships the compiled core; if it ever fails to
# import (or is missing), the daemon refuses to start (exit 1, `startup_failed`) rather than run
# at several times the CPU. HAPROXY_FORWARDER_NO_EXTENSIONS=1 still chooses pure Python.
# The copied venv works on this stage's interpreter (no compiler here): checked once.
RUN haproxy-forwarder --version | grep "ingest: native" \
    && ! command -v gcc && ! command -v cc

USER 10514:10514
WORKDIR /var/lib/haproxy-forwarder
# The spool (spool.dir of the shipped config): batches waiting for the intake, dead letters.
VOLUME ["/var/lib/haproxy-forwarder"]
# Syslog (TCP, UDP); 9514 is the status endpoint once status.listen is not loopback (compose).
EXPOSE 1514/tcp 1514/udp 9514/tcp
# `haproxy-forwarder status` reads /healthz at the config's status.listen, from inside the
# container (its loopback works): 503 when batches wait and nothing was delivered for
# status.stall_after, or when the spool refuses writes. Exit 0 healthy, 1 failing.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["haproxy-forwarder", "status", "--once"]
# SIGTERM: the daemon stops reading, delivers for up to shutdown_timeout (10 s) and writes what
# is left to the spool. Give it more than that before SIGKILL: `--stop-timeout 30`,
# compose `stop_grace_period: 30s`. Exec form: the daemon is PID 1 and gets the signal itself.
STOPSIGNAL SIGTERM
ENTRYPOINT ["haproxy-forwarder"]
CMD ["run"]
