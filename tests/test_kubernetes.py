"""deploy/kubernetes: every manifest valid for the Kubernetes API (offline, kubernetes-validate,
strict), and consistent with the project it deploys.

Consistent means: the ConfigMap's config.toml loads as a valid config (haproxy_forwarder.config)
in the files and environment the pod gives it, and runs (the real daemon answers the probes'
paths and delivers through the key file the init container installs; the drain Job's command
delivers the spool a killed forwarder left); its listeners are the container ports and the
Services' ports; spool.dir is the PVC's mountPath and fits in it; status.listen is where the
probes and the ServiceMonitor look; the grace period covers the shutdown; the pod runs as the
Dockerfile's user. No cluster and no network: the schemas ship with kubernetes-validate;
`kubectl kustomize`, when kubectl is installed, runs offline. The ServiceMonitor's CRD is not
among the schemas: its fields are checked against the part of the CRD it uses, by hand.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import trustme
import yaml
from kubernetes_validate import utils as kv_utils
from packaging.version import Version

from devtools import REPO
from devtools.daemon import ENV_PREFIX, Daemon, write_toml
from devtools.probe import metric, wait_until
from devtools.traffic import octet_frame, send_tcp, traditional
from haproxy_forwarder import __version__, config
from haproxy_forwarder.app import TCP_DRAIN_GRACE
from haproxy_forwarder.configcheck import risky_settings
from tests.fake_intake import VALID_KEY, FakeIntake

DEPLOY = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "Dockerfile"
ALERTS = REPO / "config" / "prometheus" / "haproxy-forwarder-alerts.yml"

#: The oldest Kubernetes the manifests are for (README.md there): preStop `sleep` is on by
#: default from 1.30. Every schema version kubernetes-validate has from there on is checked.
MIN_KUBERNETES = "1.30"
#: Not in the core schemas: checked by hand below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")
#: In the directory, deliberately not applied by the kustomization.
NOT_APPLIED = {"secret-intake-keys.example.yaml", "drain-spool.yaml"}
#: The kubelet resets a container's restart back-off after it ran this long (2 x 5 min).
BACKOFF_RESET = 600
#: The listener kinds of config.toml and the protocol of their container ports.
KINDS = {"tcp": "TCP", "udp": "UDP", "tls": "TCP", "relp": "TCP"}


# -- reading the manifests ------------------------------------------------------------------

def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every non-empty YAML document of deploy/kubernetes."""
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, f"{path.name}: no YAML document"
        found += [(path.name, d) for d in docs]
    return found


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    """The one resource of that kind (and name)."""
    hits = [d for _, d in documents()
            if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"{len(hits)} {kind} {name or ''} in {DEPLOY}"
    return hits[0]


def statefulset() -> dict[str, Any]:
    return the("StatefulSet")


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = statefulset()["spec"]["template"]["spec"]
    return spec


def drain_job() -> dict[str, Any]:
    return the("Job", "haproxy-forwarder-drain-spool")


def drain_pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = drain_job()["spec"]["template"]["spec"]
    return spec


def container(spec: dict[str, Any], name: str = "haproxy-forwarder") -> dict[str, Any]:
    hits: list[dict[str, Any]] = [c for c in spec["containers"] if c["name"] == name]
    assert len(hits) == 1, name
    return hits[0]


def init_container(spec: dict[str, Any]) -> dict[str, Any]:
    inits: list[dict[str, Any]] = spec["initContainers"]
    assert len(inits) == 1
    return inits[0]


def mount_path(c: dict[str, Any], volume: str) -> str:
    paths = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == volume]
    assert len(paths) == 1, f"{c['name']} mounts volume {volume!r} {len(paths)} times"
    return str(paths[0])


def volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    hits: list[dict[str, Any]] = [v for v in spec["volumes"] if v["name"] == name]
    assert len(hits) == 1, name
    return hits[0]


def config_text() -> str:
    text: str = the("ConfigMap", "haproxy-forwarder-config")["data"]["config.toml"]
    return text


def config_toml() -> dict[str, Any]:
    return tomllib.loads(config_text())


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def container_ports(c: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Port name -> (protocol, number)."""
    return {p["name"]: (p.get("protocol", "TCP"), p["containerPort"]) for p in c["ports"]}


def quantity(text: str) -> int:
    """A Kubernetes quantity in binary units ("2Gi") as bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text)
    assert m, f"quantity {text!r}: only binary units are expected here"
    return int(m[1]) * units.get(m[2] or "", 1)


def seconds(duration: str) -> int:
    """A Prometheus duration of minutes and seconds ("1m30s") in seconds."""
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert m and duration, f"duration {duration!r}"
    return int(m[1] or 0) * 60 + int(m[2] or 0)


def schema_versions() -> list[str]:
    """Every Kubernetes version kubernetes-validate has schemas for, from MIN_KUBERNETES."""
    versions = [v for v in kv_utils.all_versions() if Version(v) >= Version(MIN_KUBERNETES)]
    assert versions, (f"kubernetes-validate {kubernetes_validate.__version__} has no schemas "
                      f"for Kubernetes {MIN_KUBERNETES} or later: upgrade it")
    return versions


# -- the Dockerfile -------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            out = []  # only the stage that runs counts
        out.append((word.upper(), rest.strip()))
    return out


def image_user() -> tuple[int, int | None]:
    """(uid, gid or None) the image runs as: USER, numeric or the name a useradd line gives
    a --uid."""
    steps = dockerfile_instructions()
    users = [arg for word, arg in steps if word == "USER"]
    assert users, "the Dockerfile's last stage has no USER: the image would run as root"
    user, _, group = users[-1].partition(":")
    gid = int(group) if group.isdigit() else None
    if user.isdigit():
        return int(user), gid
    for word, arg in steps:
        words = shlex.split(arg) if word == "RUN" else []
        for i, w in enumerate(words):
            if w != "useradd":
                continue
            # useradd's arguments, up to the next shell operator; the name is its last word.
            cmd = list(words[i + 1:])
            for j, x in enumerate(cmd):
                if x in ("&&", ";", "||", "|"):
                    cmd = cmd[:j]
                    break
            if cmd and cmd[-1] == user:
                for j, x in enumerate(cmd):
                    if x in ("--uid", "-u"):
                        return int(cmd[j + 1]), gid
                    if x.startswith("--uid="):
                        return int(x.partition("=")[2]), gid
    raise AssertionError(f"Dockerfile: USER {user} is not created by a useradd with --uid")


def image_env() -> dict[str, str]:
    """The ENV of the image (KEY=value pairs)."""
    env: dict[str, str] = {}
    for word, arg in dockerfile_instructions():
        if word == "ENV":
            for pair in shlex.split(arg):
                key, sep, value = pair.partition("=")
                assert sep, f"Dockerfile: ENV {arg!r}: write KEY=value"
                env[key] = value
    return env


def image_volumes() -> list[str]:
    vols: list[str] = []
    for word, arg in dockerfile_instructions():
        if word == "VOLUME":
            vols += yaml.safe_load(arg) if arg.startswith("[") else arg.split()
    return vols


# -- schemas --------------------------------------------------------------------------------

def test_every_manifest_is_valid_for_every_supported_kubernetes_version() -> None:
    docs = documents()
    kinds = {(d["apiVersion"], d["kind"]) for _, d in docs}
    unknown = kinds - CRDS - {KUSTOMIZATION} - {
        ("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "Service"), ("batch/v1", "Job"),
        ("apps/v1", "StatefulSet"), ("policy/v1", "PodDisruptionBudget")}
    # A kind added later gets a line here on purpose: is it core, or a CRD checked by hand?
    assert not unknown, f"kinds this test does not know: {unknown}"
    errors = []
    for version in schema_versions():
        for name, doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRDS | {KUSTOMIZATION}:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                errors.append(f"{name} {doc['kind']}/{doc['metadata']['name']} "
                              f"(Kubernetes {version}): {where}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_schema_check_refuses_what_the_api_server_would() -> None:
    """The validation above is live: a misspelt field and a wrong type are refused."""
    version = schema_versions()[-1]
    typo = copy.deepcopy(statefulset())
    c = typo["spec"]["template"]["spec"]["containers"][0]
    c["livenessprobe"] = c.pop("livenessProbe")
    wrong_type = copy.deepcopy(statefulset())
    wrong_type["spec"]["replicas"] = "two"
    for doc in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, version, strict=True)


#: The part of the ServiceMonitor CRD (prometheus-operator, monitoring.coreos.com/v1) these
#: manifests use, with every field name and type as the CRD has it; no other field allowed.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"},
                           "labels": {"type": "object",
                                      "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object", "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"matchLabels": {
                        "type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["port"], "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            # The CRD's Duration pattern.
                            "interval": {"type": "string",
                                         "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
                                                    r"(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
                                                    r"(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string",
                                              "pattern": r"^(0|(([0-9]+)m)?(([0-9]+)s)?)$"},
                        },
                    },
                },
            },
        },
    },
}


def test_the_service_monitor_scrapes_the_status_port_of_each_pod() -> None:
    monitor = the("ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    spec = monitor["spec"]
    wanted = spec["selector"]["matchLabels"]
    services = [d for _, d in documents() if d["kind"] == "Service"]
    selected = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
    # Exactly the headless Service: one target per pod, not one per balancer.
    assert [s["metadata"]["name"] for s in selected] == [statefulset()["spec"]["serviceName"]]
    headless = selected[0]
    assert headless["spec"].get("clusterIP") == "None"
    (endpoint,) = spec["endpoints"]
    (port,) = [p for p in headless["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert container_ports(container(pod_spec()))[port["targetPort"]] == (
        "TCP", port_of(config_toml()["status"]["listen"]))
    assert endpoint["path"] == "/metrics" and endpoint.get("scheme", "http") == "http"
    assert seconds(endpoint["interval"]) > seconds(endpoint["scrapeTimeout"])
    # The job label the alert rules select on.
    job = headless["metadata"]["labels"][spec["jobLabel"]]
    assert f'up{{job="{job}"}}' in ALERTS.read_text()


def test_the_service_monitor_check_refuses_a_misspelt_field() -> None:
    monitor = copy.deepcopy(the("ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    monitor = copy.deepcopy(the("ServiceMonitor"))
    monitor["spec"]["endpoint"] = monitor["spec"].pop("endpoints")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_the_kustomization_applies_every_manifest_but_the_examples() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - NOT_APPLIED
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: `kubectl kustomize` not run (the file list "
                    "was checked)")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    applied = [d for name, d in documents() if name in kustomization["resources"]]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(applied, key=key)


# -- the config and the ports ---------------------------------------------------------------

def listeners(cfg: dict[str, Any]) -> set[tuple[str, int]]:
    """(container port protocol, port) of every listener of a config.toml."""
    listen = cfg.get("listen", {})
    return {(KINDS[kind], port_of(a)) for kind in KINDS for a in listen.get(kind, [])}


def test_the_container_ports_are_the_listeners_of_the_config() -> None:
    cfg = config_toml()
    ports = container_ports(container(pod_spec()))
    status = ports.pop("status")
    assert status == ("TCP", port_of(cfg["status"]["listen"]))
    assert set(ports.values()) == listeners(cfg)
    assert len(set(ports.values())) == len(ports), "a listener port named twice"
    # Each kind of listener the config opens, and the defaults: TCP and UDP on 1514.
    assert {k for k in KINDS if cfg["listen"].get(k)} == set(KINDS)
    assert ("TCP", 1514) in listeners(cfg) and ("UDP", 1514) in listeners(cfg)
    # Inside the pod every listener binds every address (the Services reach the pod's IP).
    hosts = {a.rpartition(":")[0] for k in KINDS for a in cfg["listen"][k]}
    assert hosts == {"0.0.0.0"} and cfg["status"]["listen"].startswith("0.0.0.0:")


def test_the_services_reach_every_listener_and_keep_the_sender_address() -> None:
    pod_labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    ports = container_ports(container(pod_spec()))
    served: dict[str, set[tuple[str, int]]] = {}
    for svc in (d for _, d in documents() if d["kind"] == "Service"):
        spec, name = svc["spec"], svc["metadata"]["name"]
        assert spec["selector"].items() <= pod_labels.items(), name
        for p in spec["ports"]:
            proto, number = ports[p["targetPort"]]  # a named port of the container
            assert p.get("protocol", "TCP") == proto, (name, p)
            served.setdefault(name, set()).add((proto, number))
        if spec.get("type") in ("LoadBalancer", "NodePort"):
            # Otherwise kube-proxy SNATs the senders to a node's address.
            assert spec.get("externalTrafficPolicy") == "Local", name
            assert ("TCP", ports["status"][1]) not in served[name], \
                f"{name} exposes the unauthenticated status port outside the cluster"
    headless = statefulset()["spec"]["serviceName"]
    assert the("Service", headless)["spec"]["clusterIP"] == "None"
    wanted = listeners(config_toml())
    assert wanted <= served[headless]
    outside = set().union(*(v for k, v in served.items() if k != headless))
    assert outside == wanted, "every listener, and only listeners, reachable from outside"


def test_the_probes_ask_the_status_endpoint_for_liveness_and_readiness() -> None:
    c = container(pod_spec())
    status = port_of(config_toml()["status"]["listen"])
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe",
                                                   "livenessProbe")}
    for kind, get in probes.items():
        assert container_ports(c)[get["port"]] == ("TCP", status), kind
        assert get.get("scheme", "HTTP") == "HTTP", kind
    assert probes["livenessProbe"]["path"] == "/livez"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["startupProbe"]["path"] == "/readyz"


def test_a_stalled_intake_restarts_the_pod_without_a_growing_back_off() -> None:
    """/livez fails stall_after seconds into a whole outage; the liveness probe restarts
    the container only after its failures last longer than what is left of the kubelet's
    10 minutes, so the restart back-off never grows past its first step."""
    live = container(pod_spec())["livenessProbe"]
    stall_after = config_toml()["status"].get("stall_after", config.StatusConfig().stall_after)
    assert stall_after + live["periodSeconds"] * live["failureThreshold"] > BACKOFF_RESET


def test_the_grace_period_covers_the_shutdown() -> None:
    cfg, spec = config_toml(), pod_spec()
    pre_stop = container(spec)["lifecycle"]["preStop"]["sleep"]["seconds"]
    # preStop, then SIGTERM: the listeners drain, what is in memory is delivered within
    # shutdown_timeout, the rest is written to the spool; 10 s left for that and the exit.
    needed = pre_stop + TCP_DRAIN_GRACE + cfg["shutdown_timeout"] + 10
    assert spec["terminationGracePeriodSeconds"] >= needed


def test_the_spool_is_on_the_persistent_volume_and_fits_in_it() -> None:
    sts = statefulset()
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    spool = config_toml()["spool"]
    for spec in (pod_spec(), drain_pod_spec()):
        assert mount_path(container(spec), claim["metadata"]["name"]) == spool["dir"]
    # The image declares the same place a volume.
    assert spool["dir"] in image_volumes()
    size = quantity(claim["spec"]["resources"]["requests"]["storage"])
    # The spool and the dead letters at their bounds, plus a quarter for the quarantine's
    # copies, the requeue folder and the file system.
    assert size >= 1.25 * (spool["max_size"] + spool["dead_letter_max_size"])
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain", "whenScaled": "Retain"}
    drain = volume(drain_pod_spec(), claim["metadata"]["name"])
    assert re.fullmatch(rf"{claim['metadata']['name']}-{sts['metadata']['name']}-\d+",
                        drain["persistentVolumeClaim"]["claimName"])


def test_the_disruption_budget_lets_drains_through_one_pod_at_a_time() -> None:
    pdb = the("PodDisruptionBudget")["spec"]
    labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1 and statefulset()["spec"]["replicas"] >= 2


# -- the image and the pod's security -------------------------------------------------------

def test_the_pod_runs_as_the_image_user() -> None:
    uid, gid = image_user()
    for spec in (pod_spec(), drain_pod_spec()):
        ctx = spec["securityContext"]
        assert ctx["runAsUser"] == uid and ctx["runAsNonRoot"] is True
        assert gid is None or ctx["runAsGroup"] == gid
        # The PVC writable and the Secret files readable by that user's group.
        assert ctx["fsGroup"] == ctx["runAsGroup"]
        for c in spec["containers"] + spec["initContainers"]:
            assert c.get("securityContext", {}).get("runAsUser", uid) == uid, c["name"]
            # The image built from this tree, at this version.
            assert c["image"].rpartition(":")[2] == __version__, c["name"]


def test_the_pods_meet_the_restricted_pod_security_standard() -> None:
    allowed_volumes = {"configMap", "secret", "emptyDir", "persistentVolumeClaim",
                       "projected", "downwardAPI", "csi", "ephemeral"}
    for spec in (pod_spec(), drain_pod_spec()):
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for v in spec["volumes"]:
            assert set(v) - {"name"} <= allowed_volumes, v
        for c in spec["containers"] + spec["initContainers"]:
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, c["name"]
            assert ctx["capabilities"] == {"drop": ["ALL"]}, c["name"]
            # The daemon writes only under spool.dir (the PVC), the init container only
            # into the key volume.
            assert ctx["readOnlyRootFilesystem"] is True, c["name"]
            assert not any("hostPort" in p for p in c.get("ports", [])), c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]


def service_link_env(service: dict[str, Any]) -> dict[str, str]:
    """The variables the kubelet's service links give a pod for a Service with a cluster IP
    (pkg/kubelet/envvars: the name upper-cased, '-' made '_')."""
    name = service["metadata"]["name"].upper().replace("-", "_")
    first = service["spec"]["ports"][0]
    proto = first.get("protocol", "TCP")
    url = f"{proto.lower()}://10.96.0.10:{first['port']}"
    env = {f"{name}_SERVICE_HOST": "10.96.0.10", f"{name}_SERVICE_PORT": str(first["port"]),
           f"{name}_PORT": url}
    for p in service["spec"]["ports"]:
        env[f"{name}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
        env[f"{name}_PORT_{p['port']}_{p.get('protocol', 'TCP')}"] = url
    return env


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in list(os.environ):
        if var.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(var)
    return monkeypatch


def test_service_links_are_off_and_their_variables_would_not_stop_the_daemon(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """Service links would give the pod HAPROXY_FORWARDER_SYSLOG_SERVICE_HOST and the like
    (from the Service haproxy-forwarder-syslog): off (nothing reads them), and should a
    hand-written manifest leave them on, the daemon knows them for no setting: it starts."""
    for spec in (pod_spec(), drain_pod_spec()):
        assert spec["enableServiceLinks"] is False
    linked = [d for _, d in documents()
              if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"]
    env = {k: v for svc in linked for k, v in service_link_env(svc).items()}
    assert any(k.startswith(ENV_PREFIX) for k in env)
    path = tmp_path / "config.toml"
    path.write_text("# the defaults\n")
    for var, value in env.items():
        clean_env.setenv(var, value)
    config.load(str(path))  # no ConfigError


# -- the key --------------------------------------------------------------------------------

def kubelet_secret_volume(root: Path, entries: dict[str, str], mode: int) -> Path:
    """A Secret volume as the kubelet's atomic writer lays it out: the files in a timestamped
    folder, `..data` a symlink to it, each entry a symlink through `..data`."""
    stamped = root / "..2026_01_01_00_00_00.000000001"
    stamped.mkdir(parents=True)
    for name, value in entries.items():
        (stamped / name).write_text(value)
        (stamped / name).chmod(mode)
    (root / "..data").symlink_to(stamped.name)
    for name in entries:
        (root / name).symlink_to(f"..data/{name}")
    return root


def install_keys(src: Path, dst: Path) -> subprocess.CompletedProcess[str]:
    """The init container's command, run here with the folders standing for its mounts."""
    init = init_container(pod_spec())
    assert init["command"][:2] == ["python", "-c"] and len(init["command"]) == 5
    script = init["command"][2]
    return subprocess.run([sys.executable, "-c", script, str(src), str(dst)],
                          capture_output=True, text=True, timeout=30, check=False)


def test_the_key_file_comes_from_the_secret_through_the_init_container(tmp_path: Path) -> None:
    spec, cfg = pod_spec(), config_toml()
    init, main = init_container(spec), container(spec)
    src_arg, dst_arg = init["command"][3:]
    # Where the script reads is the Secret's mount, where it writes the memory volume's,
    # which the daemon's container mounts where config.toml's key_file points.
    secret_volume = volume(spec, "intake-keys")
    assert mount_path(init, "intake-keys") == src_arg
    assert volume(spec, "keys")["emptyDir"]["medium"] == "Memory"
    assert mount_path(init, "keys") == dst_arg == mount_path(main, "keys")
    key_file = Path(cfg["intake"]["key_file"])
    assert key_file.parent == Path(dst_arg)
    example = the("Secret", secret_volume["secret"]["secretName"])
    assert set(example["stringData"]) == {key_file.name}
    # The drain Job gets its key the same way.
    assert init_container(drain_pod_spec()) == init
    for name in ("intake-keys", "keys"):
        assert volume(drain_pod_spec(), name) == volume(spec, name)

    # What the kubelet makes of the Secret with fsGroup set: root's file, mode 0440 whatever
    # defaultMode says. read_key_file refuses it: that is why the init container is there.
    assert secret_volume["secret"]["defaultMode"] == 0o440
    src = kubelet_secret_volume(tmp_path / "secret", {key_file.name: VALID_KEY + "\n"}, 0o440)
    with pytest.raises(ValueError, match="has mode 0440"):
        config.read_key_file(src / key_file.name)
    dst = tmp_path / "keys"
    dst.mkdir()
    for _ in range(2):  # a restarted pod runs it again over its previous copy
        done = install_keys(src, dst)
        assert done.returncode == 0, done.stderr
    installed = dst / key_file.name
    st = installed.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o400
    assert st.st_uid == os.getuid()
    assert config.read_key_file(installed) == VALID_KEY
    assert sorted(p.name for p in dst.iterdir()) == [key_file.name]
    assert VALID_KEY not in done.stdout + done.stderr


def test_the_example_secret_holds_a_placeholder_the_daemon_refuses(tmp_path: Path) -> None:
    (value,) = the("Secret", "haproxy-forwarder-intake-keys")["stringData"].values()
    path = tmp_path / "key"
    path.write_text(value)
    path.chmod(0o400)
    with pytest.raises(ValueError, match="alphanumeric"):
        config.read_key_file(path)


def test_an_empty_key_secret_stops_the_init_container(tmp_path: Path) -> None:
    src = kubelet_secret_volume(tmp_path / "secret", {}, 0o440)
    dst = tmp_path / "keys"
    dst.mkdir()
    done = install_keys(src, dst)
    assert done.returncode != 0 and "no key" in done.stderr


# -- the config as the pod loads it ---------------------------------------------------------

@pytest.fixture
def pod_files(tmp_path: Path) -> dict[str, Path]:
    """What the pod's volumes hold, in folders here: the key installed by the init container,
    a certificate and key for the TLS Secret."""
    key_name = Path(config_toml()["intake"]["key_file"]).name
    src = kubelet_secret_volume(tmp_path / "secret", {key_name: VALID_KEY}, 0o440)
    keys = tmp_path / "keys"
    keys.mkdir()
    assert install_keys(src, keys).returncode == 0
    tls = tmp_path / "tls"
    tls.mkdir()
    cert = trustme.CA().issue_cert("haproxy-forwarder.example.org")
    cert.cert_chain_pems[0].write_to_path(str(tls / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tls / "tls.key"))
    return {"keys": keys, "tls": tls}


def pod_paths(files: dict[str, Path]) -> dict[str, dict[str, str]]:
    """config.toml's file settings, moved from the pod's mount points to the folders of
    `pod_files`: each must be inside the mount of the volume that holds it."""
    spec, cfg = pod_spec(), config_toml()
    main = container(spec)
    moved: dict[str, dict[str, str]] = {"tls": {}, "intake": {}}
    for section, key, vol in (("tls", "cert_file", "tls"), ("tls", "key_file", "tls"),
                              ("intake", "key_file", "keys")):
        path = Path(cfg[section][key])
        assert path.parent == Path(mount_path(main, vol)), f"{section}.{key}"
        moved[section][key] = str(files[vol] / path.name)
    # The TLS files are the entries of a kubernetes.io/tls Secret.
    assert volume(spec, "tls")["secret"]["secretName"] == "haproxy-forwarder-tls"
    assert {Path(cfg["tls"][k]).name for k in ("cert_file", "key_file")} == {"tls.crt",
                                                                             "tls.key"}
    return moved


def pod_env(spec: dict[str, Any]) -> dict[str, str]:
    """The daemon's environment in that pod: the image's ENV, then the container's env."""
    env = {k: v for k, v in image_env().items() if k.startswith(ENV_PREFIX)}
    env.update({e["name"]: e["value"] for e in container(spec).get("env", [])})
    return env


def test_the_config_loads_in_the_pod_as_valid_with_its_key(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, pod_files: dict[str, Path],
) -> None:
    spec, cfg = pod_spec(), config_toml()
    env = pod_env(spec)
    # The daemon finds config.toml where the ConfigMap is mounted.
    config_path = Path(env.pop(f"{ENV_PREFIX}CONFIG"))
    assert config_path.parent == Path(mount_path(container(spec), "config"))
    assert config_path.name in the("ConfigMap", volume(spec, "config")["configMap"]["name"])[
        "data"]
    for var, value in env.items():
        clean_env.setenv(var, value)
    path = tmp_path / "config.toml"
    path.write_text(config_text())
    settings = config.load(str(path), overrides=pod_paths(pod_files))
    settings.require_key()
    assert settings.intake_keys() == [VALID_KEY]
    assert settings.spool.dir == Path(cfg["spool"]["dir"])
    assert {(KINDS[k], port_of(a)) for k in KINDS for a in getattr(settings.listen, k)} == \
        listeners(cfg)
    assert settings.status.listen == cfg["status"]["listen"]
    assert settings.shutdown_timeout == cfg["shutdown_timeout"]
    # What check-config says of it: the two choices configmap.yaml explains, nothing else.
    warnings = risky_settings(settings)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("listen.tls without tls.client_ca_file")
    assert warnings[1].startswith("status.listen = 0.0.0.0:9514")


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_config(files: dict[str, Path], fi: FakeIntake, tmp: Path) -> dict[str, Any]:
    """config.toml as the daemon runs it here: the same, but loopback and OS-chosen ports
    (the kinds of listener kept), the spool and the files in `tmp`, the fake intake."""
    cfg = copy.deepcopy(config_toml())
    for kind in KINDS:
        cfg["listen"][kind] = ["127.0.0.1:0" for _ in cfg["listen"].get(kind, [])]
    cfg["status"]["listen"] = "127.0.0.1:0"
    cfg["spool"]["dir"] = str(tmp / "spool")
    for section, values in pod_paths(files).items():
        cfg[section].update(values)
    cfg["intake"].update(url=fi.url, ca_file=fi.ca_file)
    return cfg


def test_the_daemon_runs_the_pod_config_and_answers_the_probes(
    tmp_path: Path, pod_files: dict[str, Path], intake: FakeIntake,
) -> None:
    spec = pod_spec()
    c = container(spec)
    d = Daemon(tmp_path, run_config(pod_files, intake, tmp_path), env=daemon_env(spec),
               isolate_env=True)
    with d:
        assert {r["proto"] for r in d.events("listening")} == set(KINDS) | {"http"}
        probes = [c[k]["httpGet"]["path"] for k in ("startupProbe", "readinessProbe",
                                                     "livenessProbe")]
        for path in probes:
            status, body = get(d.status_port, path)
            assert status == 200, (path, body)
        status, body = get(d.status_port, the("ServiceMonitor")["spec"]["endpoints"][0]["path"])
        assert status == 200 and b"haproxy_forwarder_build_info" in body
        # Delivered with the key the init container installed.
        line = "10.0.0.1:51234 [26/Nov/2025:10:00:00.123] www app/app1 0/0/1/2/3 200 512"
        send_tcp(d.tcp_port, octet_frame(traditional("haproxy", line)))
        assert intake.wait_for(1, timeout=15)
        assert intake.event_texts() == [line]
    assert d.proc is not None and d.proc.returncode == 0


def daemon_env(spec: dict[str, Any]) -> dict[str, str]:
    """pod_env for a run here: the config file is the test's (--config or the variable), and
    the image's demand for the compiled core is the image's business (this venv may run the
    pure reader)."""
    env = pod_env(spec)
    env.pop(f"{ENV_PREFIX}CONFIG")
    env.pop(f"{ENV_PREFIX}EXPECT_COMPILED", None)
    return env


def test_the_drain_job_delivers_the_spool_a_dead_pod_left(
    tmp_path: Path, pod_files: dict[str, Path], intake: FakeIntake,
) -> None:
    """A forwarder takes events while the intake is down, and dies (SIGKILL, its node lost):
    they wait in its spool. The drain Job's command, run with the Job's environment on that
    spool, delivers every one of them, once, and exits 0."""
    cfg = run_config(pod_files, intake, tmp_path)
    cfg["intake"]["retry_max"] = 0.5
    lines = [f"10.0.0.{i}:5000 [26/Nov/2025:10:00:00.123] www app/app1 0/0/1/2/3 200 {i}"
             for i in range(50)]
    intake.set_down(True)
    d = Daemon(tmp_path, cfg, env=daemon_env(pod_spec()), isolate_env=True).start()
    try:
        send_tcp(d.tcp_port, b"".join(octet_frame(traditional("haproxy", t)) for t in lines))
        wait_until(lambda: metric(d.status_port, "spool_events") == len(lines), 30,
                   "the events in the spool", detail=d.stderr_text)
    finally:
        assert d.proc is not None
        d.proc.kill()
        d.proc.wait(10)
        d.close_files()
    intake.set_down(False)

    job = container(drain_pod_spec())
    args = list(job["args"])
    # --dir is where the Job mounts the PVC: the removed pod's spool.dir.
    assert args[:2] == ["spool", "deliver"]
    assert args[args.index("--dir") + 1] == config_toml()["spool"]["dir"]
    args[args.index("--dir") + 1] = cfg["spool"]["dir"]
    path = tmp_path / "job.toml"
    write_toml(path, cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(daemon_env(drain_pod_spec()), **{f"{ENV_PREFIX}CONFIG": str(path)})
    done = subprocess.run([sys.executable, "-m", "haproxy_forwarder", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is empty" in done.stdout
    assert sorted(intake.event_texts()) == sorted(lines)
    assert VALID_KEY not in done.stdout + done.stderr


def test_the_drain_job_is_the_forwarder_without_its_listeners() -> None:
    sts, drain = pod_spec(), drain_pod_spec()
    main, other = container(sts), container(drain)
    assert other["image"] == main["image"]
    assert other["env"] == main["env"]
    assert "ports" not in other and "livenessProbe" not in other
    assert other["volumeMounts"] == main["volumeMounts"]
    for v in main["volumeMounts"]:
        if v["name"] != "spool":
            assert volume(drain, v["name"]) == volume(sts, v["name"])
    assert drain["securityContext"] == sts["securityContext"]
    # No Service sends it anything, no ServiceMonitor scrapes it.
    labels = drain_job()["spec"]["template"]["metadata"]["labels"]
    for _, svc in documents():
        if svc["kind"] == "Service":
            assert not svc["spec"]["selector"].items() <= labels.items()
    assert not statefulset()["spec"]["selector"]["matchLabels"].items() <= labels.items()
