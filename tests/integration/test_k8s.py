"""Kubernetes manifests: every overlay renders, passes schema validation and meets the project's policies.

Rendering is real (``kubectl kustomize``) and so is validation (``kubernetes-validate --strict``). The
overlays need their git-ignored ``secrets.env``: the tests copy ``k8s/`` into a temporary folder and
write a throwaway one from ``k8s/secrets.env.example`` there, so an operator's real file is never read
or touched. The policy checks are functions over the rendered objects, so the negative tests can show
each one catching a bad manifest.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import ipaddress
import pathlib
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import psycopg
import pytest
import yaml
from sqlalchemy import make_url

from services.aggregator.config import AggregatorConfig
from services.indicators.config import IndicatorsConfig
from services.inference.config import InferenceConfig
from services.ingest.config import IngestConfig
from services.mesh.config import MeshConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "staging", "production")
SECRETS_TEMPLATE = K8S / "secrets.env.example"
# The oldest Kubernetes these manifests are meant for (native gRPC probes and the preStop sleep action
# need 1.30+; kubectl here is 1.32) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.32.0", None)

Manifest = dict[str, Any]

# The generated part of a pod name that is not a StatefulSet's (ReplicaSet hash, random suffix):
# what the downward API's metadata.name gives such a pod, for the env checks.
SAMPLE_POD_SUFFIX = "7d4b9c8f6d-x2k9p"

SERVICES = ("ingest", "aggregator", "indicators", "inference")
GRPC_PORTS = {"ingest": 50051, "aggregator": 50052, "indicators": 50053, "inference": 50054}
METRICS_PORTS = {"ingest": 9101, "aggregator": 9102, "indicators": 9103, "inference": 9104}
HPA_TARGETS = ("gateway", "ingest", "inference")
# The stages with one writer per symbol, each sharded (k8s/README.md, "Scale past one node: shards"): a
# StatefulSet of one pod per shard, by name, and the prefix of its <PREFIX>_SHARD_COUNT, _SHARD_INDEX
# and _FEED_POLL_SECONDS.
SHARDED_STAGES = {"aggregator": "AGGREGATOR", "indicators": "INDICATORS"}
# Every sharded stage's shard count, per overlay.
SHARDS = {"dev": 1, "staging": 2, "production": 3}
# How often a shard looks for what other shards committed (k8s/base/aggregator.yaml, indicators.yaml).
SHARD_FEED_POLL_SECONDS = 0.2
LOG_LEVELS = {"dev": "DEBUG", "staging": "INFO", "production": "WARNING"}
MIN_REPLICAS = {"dev": 1, "staging": 2, "production": 3}
POD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")

# Each Python container and the function that reads its configuration from the environment.
CONFIG_READERS: dict[str, Callable[[Mapping[str, str]], object]] = {
    "ingest": IngestConfig.from_env,
    "aggregator": AggregatorConfig.from_env,
    "indicators": IndicatorsConfig.from_env,
    "inference": InferenceConfig.from_env,
    "migrate": MeshConfig.from_env,
}
# Read by libraries rather than by our config: the OpenTelemetry SDK.
LIBRARY_ENV = frozenset({"OTEL_SERVICE_NAME"})
# Documented by the third-party images that read them.
IMAGE_ENV = {
    "timescaledb": frozenset(
        {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA", "TIMESCALEDB_TELEMETRY"}
    ),
    "jaeger": frozenset(),
    "envoy": frozenset(),
}
LIBPQ_ENV = frozenset({"PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"})
# Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)

# The connections the design has (k8s/components/network-policies/kustomization.yaml lists them):
# (from, to, port, protocol). "world" is any client outside the cluster's namespaces we know,
# "prometheus" a pod of the monitoring namespace, "kube-dns" the cluster DNS.
DATABASE_CLIENTS = (*SERVICES, "db-migrate", "db-backup", "db-restore")
WORKLOADS = (*SERVICES, "gateway", "timescaledb", "jaeger", "db-migrate", "db-backup", "db-restore")
EXPECTED_EDGES = frozenset(
    {
        ("world", "gateway", 8080, "TCP"),
        # The gateway's port is open to every client, so Prometheus's pods reach it too.
        ("prometheus", "gateway", 8080, "TCP"),
        *{("gateway", s, GRPC_PORTS[s], "TCP") for s in SERVICES},
        *{("ingest", s, GRPC_PORTS[s], "TCP") for s in ("aggregator", "indicators", "inference")},
        ("aggregator", "ingest", 50051, "TCP"),
        ("indicators", "aggregator", 50052, "TCP"),
        ("inference", "indicators", 50053, "TCP"),
        *{(c, "timescaledb", 5432, "TCP") for c in DATABASE_CLIENTS},
        *{(s, "jaeger", 4317, "TCP") for s in (*SERVICES, "gateway")},
        *{("prometheus", s, METRICS_PORTS[s], "TCP") for s in SERVICES},
        # Envoy's metrics listener (envoy/envoy.yaml).
        ("prometheus", "gateway", 9902, "TCP"),
        *{(w, "kube-dns", 53, proto) for w in WORKLOADS for proto in ("UDP", "TCP")},
    }
)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rendered:
    """One overlay as kubectl renders it, and the throwaway secrets it was rendered with."""

    overlay: str
    path: pathlib.Path
    docs: list[Manifest]
    secret_values: dict[str, str]

    def one(self, kind: str, name: str) -> Manifest:
        """The object of this kind whose name is ``name`` (or, for generated ones, starts with it)."""
        found = [
            d
            for d in self.docs
            if d["kind"] == kind
            and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", d["metadata"]["name"])
        ]
        assert len(found) == 1, f"{self.overlay}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    @property
    def namespace(self) -> str:
        """The overlay's namespace."""
        return str(self.one_of_kind("Namespace")["metadata"]["name"])

    def one_of_kind(self, kind: str) -> Manifest:
        """The only object of a kind."""
        found = [d for d in self.docs if d["kind"] == kind]
        assert len(found) == 1, f"{self.overlay}: expected one {kind}, found {len(found)}"
        return found[0]


def kubectl() -> str:
    """The kubectl binary; its kustomize renders the overlays offline."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not on PATH: it renders the k8s/ overlays (kubectl kustomize)")
    return path


def template_keys(text: str) -> list[str]:
    """The keys of an env file (KEY=VALUE lines, # comments)."""
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line.partition("=")[0].strip())
    return keys


def throwaway_secrets() -> dict[str, str]:
    """A value for every key of the committed template, valid for the services (16+ characters)."""
    return {key: secrets.token_hex(16) for key in template_keys(SECRETS_TEMPLATE.read_text(encoding="utf-8"))}


def render(overlay_dir: pathlib.Path) -> list[Manifest]:
    """``kubectl kustomize`` an overlay into its objects."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(overlay_dir)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay_dir} failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """k8s/ copied without any operator's secrets.env, so rendering never reads real secrets."""
    target = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, target, ignore=shutil.ignore_patterns("secrets.env"))
    return target


@pytest.fixture(scope="module")
def rendered(k8s_copy: pathlib.Path) -> dict[str, Rendered]:
    """Every overlay, rendered with its own throwaway secrets.env (what an operator's copy would be)."""
    out = {}
    for overlay in OVERLAYS:
        values = throwaway_secrets()
        directory = k8s_copy / "overlays" / overlay
        (directory / "secrets.env").write_text(
            "".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8"
        )
        out[overlay] = Rendered(overlay, directory, render(directory), values)
    return out


def all_docs(rendered: Mapping[str, Rendered]) -> Iterator[tuple[str, Manifest]]:
    """(overlay, object) for every rendered object of every overlay."""
    for overlay, r in rendered.items():
        for doc in r.docs:
            yield overlay, doc


# ---------------------------------------------------------------------------------------------
# Pod templates and the restricted profile
# ---------------------------------------------------------------------------------------------


def pod_template(doc: Manifest) -> Manifest | None:
    """The pod template of a workload object, or None for other kinds."""
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"])
    if doc["kind"] in POD_KINDS:
        return dict(doc["spec"]["template"])
    return None


def workloads(docs: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(workload object, pod template) for every object that makes pods."""
    for doc in docs:
        template = pod_template(doc)
        if template is not None:
            yield doc, template


def image_problem(image: str) -> str | None:
    """Why an image reference is not pinned to one image, or None."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image} has no tag"
    if last.rsplit(":", 1)[1] == "latest":
        return f"image {image} uses the tag latest"
    return None


def pod_problems(doc: Manifest) -> list[str]:
    """Everything in a workload's pod template that breaks the project's pod policy.

    The restricted Pod Security Standard (non-root, no privilege escalation, capabilities dropped,
    RuntimeDefault seccomp, allowed volume types, no host namespaces), plus: read-only root filesystem,
    requests and limits, pinned images, liveness and readiness probes (Jobs and CronJobs excepted),
    no service-account token.
    """
    template = pod_template(doc)
    assert template is not None
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = template["spec"]
    pod_sc = spec.get("securityContext", {})
    problems: list[str] = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{where}: {field} is set")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken is not false")
    if spec.get("serviceAccountName", "default") == "default":
        problems.append(f"{where}: runs as the default service account")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{where}: volume {volume['name']} of type {sorted(kinds)} is not allowed")
    long_running = doc["kind"] not in ("Job", "CronJob")
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    for container in containers:
        name = f"{where}/{container['name']}"
        sc = container.get("securityContext", {})

        def effective(key: str, sc: Manifest = sc) -> Any:
            return sc.get(key, pod_sc.get(key))

        if effective("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if effective("runAsUser") == 0:
            problems.append(f"{name}: runAsUser is 0")
        if (effective("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile is not RuntimeDefault")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        capabilities = sc.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if capabilities.get("add"):
            problems.append(f"{name}: adds capabilities {capabilities['add']}")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(part, {}):
                    problems.append(f"{name}: no {resource} {part}")
        if (problem := image_problem(container["image"])) is not None:
            problems.append(f"{name}: {problem}")
        if any("hostPort" in p for p in container.get("ports", [])):
            problems.append(f"{name}: uses a hostPort")
        if long_running and container in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in container:
                    problems.append(f"{name}: no {probe}")
    return problems


def a_good_deployment() -> Manifest:
    """A minimal Deployment that meets the pod policy (for the negative tests)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "example"},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "example"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "example"}},
                "spec": {
                    "serviceAccountName": "example",
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "example",
                            "image": "registry.example.com/example:1.0.0",
                            "livenessProbe": {"grpc": {"port": 50051}},
                            "readinessProbe": {"grpc": {"port": 50051}},
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "64Mi"},
                                "limits": {"cpu": "1", "memory": "128Mi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                },
            },
        },
    }


# ---------------------------------------------------------------------------------------------
# Environment variables against each service's config
# ---------------------------------------------------------------------------------------------


class RecordingEnv(Mapping[str, str]):
    """A read-only environment that records every name looked up (``env.get`` goes through here)."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def decoded_secret(r: Rendered, name: str) -> dict[str, str]:
    """A rendered Secret's data, decoded."""
    secret = r.one("Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def pod_names(doc: Manifest) -> list[str]:
    """The names a workload's pods get: ``<name>-<ordinal>`` for each replica of a StatefulSet, else a sample.

    A StatefulSet scaled to 0 still gets its first name, so that its template is checked.
    """
    name = str(doc["metadata"]["name"])
    if doc["kind"] == "StatefulSet":
        return [f"{name}-{k}" for k in range(max(1, int(doc["spec"].get("replicas", 1))))]
    return [f"{name}-{SAMPLE_POD_SUFFIX}"]


def downward_value(r: Rendered, field_path: str, pod_name: str) -> str:
    """What the downward API gives a pod named ``pod_name`` for a fieldRef (a stand-in for the others)."""
    return {"metadata.name": pod_name, "metadata.namespace": r.namespace}.get(
        field_path, "from-the-downward-api"
    )


def container_env(
    r: Rendered, container: Manifest, pod_name: str
) -> tuple[dict[str, str], list[str], dict[str, tuple[str, str]]]:
    """The environment the kubelet would give a container of pod ``pod_name``, after $(VAR) expansion.

    Also returns the problems found on the way (a reference to an undefined variable) and, for
    each variable, where a secret-backed value came from (Secret name, key).
    """
    env: dict[str, str] = {}
    problems: list[str] = []
    from_secret: dict[str, tuple[str, str]] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(r.one("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(decoded_secret(r, source["secretRef"]["name"]))
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            value = str(var["value"])
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                if ref not in env:
                    problems.append(f"{container['name']}: {name} uses $({ref}) before it is defined")
                value = value.replace(f"$({ref})", env.get(ref, ""))
            env[name] = value
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[name] = decoded_secret(r, ref["name"])[ref["key"]]
            from_secret[name] = (ref["name"], ref["key"])
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[name] = r.one("ConfigMap", ref["name"])["data"][ref["key"]]
        elif "fieldRef" in var["valueFrom"]:
            env[name] = downward_value(r, var["valueFrom"]["fieldRef"]["fieldPath"], pod_name)
        else:
            env[name] = "from-the-downward-api"
    return env, problems, from_secret


def mounted_secret_file(r: Rendered, template: Manifest, container: Manifest, path: str) -> str | None:
    """The content of the Secret key a container sees at ``path``, or None if nothing is mounted there."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        volume = volumes[mount["name"]]
        if not path.startswith(prefix) or "secret" not in volume:
            continue
        relative = path[len(prefix) :]
        data = decoded_secret(r, volume["secret"]["secretName"])
        items = volume["secret"].get("items")
        mapping = {i["path"]: i["key"] for i in items} if items else {k: k for k in data}
        if relative in mapping:
            return data[mapping[relative]]
    return None


def service_ports(r: Rendered) -> dict[str, set[int]]:
    """The ports of every Service, by Service name."""
    return {
        d["metadata"]["name"]: {p["port"] for p in d["spec"]["ports"]}
        for d in r.docs
        if d["kind"] == "Service"
    }


def env_problems(r: Rendered, doc: Manifest, tmp: pathlib.Path) -> list[str]:
    """Env variables of a workload's containers that their program does not read, or values that are wrong.

    A Python service's variables must all be names its ``from_env`` reads (found by reading with a
    recording mapping), apart from names the OpenTelemetry SDK reads and secret-backed helper variables
    that only feed another variable through $(VAR). The config must load from them, listen on all
    interfaces on the container's gRPC port, export metrics on its metrics port, reach PostgreSQL, and
    name peers that exist as Services. The downward API's ``metadata.name`` is each pod's own name, so
    a StatefulSet's config must load in every one of its pods (a shard of a sharded stage takes its
    index from its ordinal).
    """
    template = pod_template(doc)
    assert template is not None
    problems: list[str] = []
    for container in template["spec"]["containers"]:
        name = container["name"]
        for pod in pod_names(doc):
            env, expansion_problems, from_secret = container_env(r, container, pod)
            problems += expansion_problems
            if name in CONFIG_READERS:
                problems += python_env_problems(r, template, container, env, from_secret, tmp)
            elif name in IMAGE_ENV:
                unknown = set(env) - IMAGE_ENV[name]
                problems += [f"{name}: {v} is not read by its image" for v in sorted(unknown)]
            else:
                problems += script_env_problems(r, template, container, env)
    # Pods of one workload mostly share their problems: each once.
    return list(dict.fromkeys(problems))


def python_env_problems(
    r: Rendered,
    template: Manifest,
    container: Manifest,
    env: dict[str, str],
    from_secret: dict[str, tuple[str, str]],
    tmp: pathlib.Path,
) -> list[str]:
    """See env_problems: the checks of one of our Python containers."""
    name = container["name"]
    problems: list[str] = []
    given = dict(env)
    key_file = env.get("MT5MESH_API_KEY_FILE")
    if key_file is not None:
        content = mounted_secret_file(r, template, container, key_file)
        if content is None:
            problems.append(f"{name}: MT5MESH_API_KEY_FILE={key_file} is not a mounted Secret key")
        else:
            local = tmp / f"{name}-api-keys"
            local.write_text(content, encoding="utf-8")
            given["MT5MESH_API_KEY_FILE"] = str(local)
    recording = RecordingEnv(given)
    try:
        config = CONFIG_READERS[name](recording)
    except ValueError as exc:
        return [*problems, f"{name}: its config does not load from the manifest's env: {exc}"]
    raw = {v["name"]: str(v.get("value", "")) for v in container.get("env", [])}
    for var in sorted(set(env) - recording.read - LIBRARY_ENV):
        feeds = [other for other, value in raw.items() if f"$({var})" in value and other in recording.read]
        if not (feeds and var in from_secret):
            problems.append(f"{name}: {var} is set but its config never reads it")
    url = make_url(env.get("DATABASE_URL", "sqlite://"))
    if url.drivername != "postgresql+psycopg":
        problems.append(f"{name}: DATABASE_URL is not PostgreSQL (postgresql+psycopg://...)")
    elif url.host not in service_ports(r) or (url.port or 5432) not in service_ports(r)[url.host or ""]:
        problems.append(f"{name}: DATABASE_URL names {url.host}:{url.port}, which is no Service")
    elif "MT5MESH_DB_PASSWORD" in from_secret and url.password != env["MT5MESH_DB_PASSWORD"]:
        problems.append(f"{name}: the password in DATABASE_URL is not the Secret's")
    runtime = getattr(config, "runtime", None)
    if runtime is None:
        return problems
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    host, _, port = runtime.listen_address.rpartition(":")
    if host not in ("0.0.0.0", "[::]"):  # noqa: S104 - a pod must listen on its pod address
        problems.append(f"{name}: listens on {runtime.listen_address}, unreachable from other pods")
    if int(port) != ports.get("grpc"):
        problems.append(f"{name}: listens on port {port}, its container port grpc is {ports.get('grpc')}")
    for probe in ("livenessProbe", "readinessProbe"):
        probe_port = container.get(probe, {}).get("grpc", {}).get("port")
        if probe_port != int(port):
            problems.append(f"{name}: {probe} checks gRPC port {probe_port}, the server listens on {port}")
    if runtime.metrics_port != ports.get("metrics"):
        problems.append(
            f"{name}: metrics on {runtime.metrics_port}, container port is {ports.get('metrics')}"
        )
    if not runtime.otlp_endpoint.startswith("http://jaeger:"):
        problems.append(f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT does not point at Jaeger")
    peers: dict[str, str] = {}
    assert dataclasses.is_dataclass(config)
    assert not isinstance(config, type)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name.endswith("_address") and isinstance(value, str):
            peers[field.name] = value
        elif isinstance(value, Mapping) and field.name.endswith("peers"):
            peers.update({f"{field.name}[{k}]": str(v) for k, v in value.items()})
    known = service_ports(r)
    for field_name, address in peers.items():
        peer_host, _, peer_port = address.rpartition(":")
        if peer_host not in known or int(peer_port) not in known[peer_host]:
            problems.append(f"{name}: {field_name} = {address} is no Service and port")
    return problems


def script_env_problems(
    r: Rendered, template: Manifest, container: Manifest, env: dict[str, str]
) -> list[str]:
    """The backup/restore containers: every variable is read by their script or by libpq."""
    name = container["name"]
    command = container.get("command", [])
    script_path = command[-1] if command else ""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    script: str | None = None
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume and script_path.startswith(mount["mountPath"].rstrip("/") + "/"):
            data = r.one("ConfigMap", volume["configMap"]["name"])["data"]
            script = data.get(script_path.rsplit("/", 1)[1])
    if script is None:
        return [f"{name}: runs {command}, which is not a script from a mounted ConfigMap"]
    return [
        f"{name}: {var} is read neither by its script nor by libpq"
        for var in sorted(env)
        if var not in LIBPQ_ENV and not re.search(rf"\$\{{?{var}\b", script)
    ]


# ---------------------------------------------------------------------------------------------
# Network policies
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: where it runs, its labels and its ports."""

    name: str
    namespace: str
    labels: Mapping[str, str]
    ports: tuple[tuple[str | None, int, str], ...]  # (name, number, protocol)


def selects(selector: Manifest, labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) matches the labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not matched:
            return False
    return True


def peer_matches(
    peer: Manifest, pod: Pod, policy_namespace: str, namespace_labels: Mapping[str, Mapping[str, str]]
) -> bool:
    """Whether a from/to entry of a policy rule matches a pod (ipBlocks match no pod here)."""
    if "ipBlock" in peer:
        return pod.namespace == "" and ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen == 0
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], namespace_labels.get(pod.namespace, {}))
    else:
        ns_ok = pod.namespace == policy_namespace
    return ns_ok and selects(peer.get("podSelector", {}), pod.labels)


def port_matches(rule_ports: list[Manifest] | None, dst: Pod, number: int, protocol: str) -> bool:
    """Whether a rule's ports list allows one port of the destination pod."""
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        port: int | str | None = entry.get("port")
        if port is None:
            return True
        if isinstance(port, str):
            if any(n == port and num == number and p == protocol for n, num, p in dst.ports):
                return True
        elif port <= number <= int(entry.get("endPort", port)):
            return True
    return False


def rule_allows(
    rules: list[Manifest],
    peers_key: str,
    other: Pod,
    dst: Pod,
    number: int,
    protocol: str,
    policy_namespace: str,
    namespace_labels: Mapping[str, Mapping[str, str]],
) -> bool:
    """Whether any rule of a policy direction lets ``other`` through to dst:port."""
    for rule in rules:
        peers = rule.get(peers_key)
        if peers and not any(peer_matches(p, other, policy_namespace, namespace_labels) for p in peers):
            continue
        if port_matches(rule.get("ports"), dst, number, protocol):
            return True
    return False


def allowed_edges(docs: list[Manifest], namespace: str) -> set[tuple[str, str, int, str]]:
    """Every (from, to, port, protocol) the NetworkPolicies allow between the pods we know."""
    ns_labels = next(d["metadata"].get("labels", {}) for d in docs if d["kind"] == "Namespace")
    namespace_labels: dict[str, Mapping[str, str]] = {
        namespace: {**ns_labels, "kubernetes.io/metadata.name": namespace},
        "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
        "kube-system": {"kubernetes.io/metadata.name": "kube-system"},
        "": {},
    }
    ours = []
    for _, template in workloads(docs):
        labels = template["metadata"]["labels"]
        ports = tuple(
            (p.get("name"), p["containerPort"], p.get("protocol", "TCP"))
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
        )
        ours.append(Pod(labels["app.kubernetes.io/name"], namespace, labels, ports))
    outside = [
        Pod("world", "", {}, ()),
        Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, ()),
        Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"))),
    ]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]

    def allowed(direction: str, subject: Pod, other: Pod, dst: Pod, number: int, protocol: str) -> bool:
        # Only pods in our namespace are subject to our policies.
        if subject.namespace != namespace:
            return True
        selecting = [
            p
            for p in policies
            if selects(p["spec"]["podSelector"], subject.labels) and direction in p["spec"]["policyTypes"]
        ]
        if not selecting:
            return True
        key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        return any(
            rule_allows(
                p["spec"].get(key, []), peers, other, dst, number, protocol, namespace, namespace_labels
            )
            for p in selecting
        )

    edges = set()
    # kube-dns is only a destination here; world and prometheus only sources.
    for src in [*ours, *outside[:2]]:
        for dst in [*ours, outside[2]]:
            if src.name == dst.name or (src.namespace != namespace and dst.namespace != namespace):
                continue
            for _, number, protocol in dst.ports:
                if allowed("Egress", src, dst, dst, number, protocol) and allowed(
                    "Ingress", dst, src, dst, number, protocol
                ):
                    edges.add((src.name, dst.name, number, protocol))
    return edges


# ---------------------------------------------------------------------------------------------
# Rendering and schema validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_rendered_by_kustomize_holds_every_workload(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    r = rendered[overlay]
    names = {t["metadata"]["labels"]["app.kubernetes.io/name"] for _, t in workloads(r.docs)}
    assert names == set(WORKLOADS)
    kinds = {d["kind"] for d in r.docs}
    assert {
        "Namespace",
        "NetworkPolicy",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Ingress",
        "StatefulSet",
        "Job",
        "CronJob",
        "Secret",
    } <= kinds
    assert all(d["metadata"].get("namespace", r.namespace) == r.namespace for d in r.docs)


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_strict_schema_validation_passes(
    rendered: dict[str, Rendered], overlay: str, version: str | None, tmp_path: pathlib.Path
) -> None:
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(rendered[overlay].docs), encoding="utf-8")
    result = validate(manifest, version)
    assert result.returncode == 0, result.stdout + result.stderr


def validate(manifest: pathlib.Path, version: str | None) -> subprocess.CompletedProcess[str]:
    """kubernetes-validate --strict (the venv's package, run with this interpreter)."""
    args = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    if version is not None:
        args += ["--kubernetes-version", version]
    return subprocess.run([*args, str(manifest)], capture_output=True, text=True, check=False, timeout=120)


def test_schema_validation_misspelt_field_is_rejected(tmp_path: pathlib.Path) -> None:
    bad = a_good_deployment()
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(bad), encoding="utf-8")
    result = validate(manifest, "1.32.0")
    assert result.returncode != 0
    assert "readinessProbes" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Pod policy
# ---------------------------------------------------------------------------------------------


def test_namespace_pod_security_labels_enforce_restricted(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        labels = r.one_of_kind("Namespace")["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels.get(f"pod-security.kubernetes.io/{mode}") == "restricted", (r.overlay, mode)


def test_pod_templates_restricted_readonly_probes_resources_have_no_violations(
    rendered: dict[str, Rendered],
) -> None:
    problems = [
        f"{overlay}: {p}"
        for overlay, doc in all_docs(rendered)
        if pod_template(doc)
        for p in pod_problems(doc)
    ]
    assert problems == []


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (
            lambda c, s: c["securityContext"].pop("readOnlyRootFilesystem"),
            "readOnlyRootFilesystem is not true",
        ),
        (lambda c, s: c["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
        (lambda c, s: c["securityContext"]["capabilities"].update(drop=[]), "do not drop ALL"),
        (lambda c, s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot is not true"),
        (lambda c, s: s["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda c, s: c.update(image="registry.example.com/example:latest"), "uses the tag latest"),
        (lambda c, s: c.update(image="registry.example.com/example"), "has no tag"),
        (lambda c, s: c.pop("livenessProbe"), "no livenessProbe"),
        (lambda c, s: c["resources"].pop("limits"), "no cpu limits"),
        (lambda c, s: s.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]), "hostPath"),
        (lambda c, s: s.pop("automountServiceAccountToken"), "automountServiceAccountToken"),
    ],
    ids=[
        "read-write-root",
        "privilege-escalation",
        "capabilities-kept",
        "root-allowed",
        "no-seccomp",
        "latest-tag",
        "untagged",
        "no-liveness",
        "no-limits",
        "host-path",
        "token-mounted",
    ],
)
def test_pod_policy_bad_container_is_reported(
    mutation: Callable[[Manifest, Manifest], object], expected: str
) -> None:
    good = a_good_deployment()
    assert pod_problems(good) == []
    bad = copy.deepcopy(good)
    spec = bad["spec"]["template"]["spec"]
    mutation(spec["containers"][0], spec)
    problems = pod_problems(bad)
    assert any(expected in p for p in problems), problems


def test_jobs_without_probes_pass_pod_policy() -> None:
    job = a_good_deployment()
    job["kind"] = "Job"
    container = job["spec"]["template"]["spec"]["containers"][0]
    del container["livenessProbe"], container["readinessProbe"]
    assert pod_problems(job) == []


def test_mesh_images_named_after_dockerfile_targets_exist(rendered: dict[str, Rendered]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, flags=re.MULTILINE | re.IGNORECASE))
    for r in rendered.values():
        for _, template in workloads(r.docs):
            for container in template["spec"]["containers"]:
                image = container["image"]
                if "/mt5-mesh/" in image:
                    target = image.rsplit("/", 1)[1].split(":")[0]
                    assert target in targets, f"{image}: no Dockerfile target {target}"


# ---------------------------------------------------------------------------------------------
# Environment and wiring
# ---------------------------------------------------------------------------------------------


def test_container_env_names_all_read_by_their_program(
    rendered: dict[str, Rendered], tmp_path: pathlib.Path
) -> None:
    problems = [
        f"{overlay}: {doc['metadata']['name']}: {p}"
        for overlay, r in rendered.items()
        for doc, _ in workloads(r.docs)
        for p in env_problems(r, doc, tmp_path)
    ]
    assert problems == []


def test_env_check_every_python_container_has_config_reader(rendered: dict[str, Rendered]) -> None:
    names = {c["name"] for _, t in workloads(rendered["production"].docs) for c in t["spec"]["containers"]}
    assert set(CONFIG_READERS) <= names


def service_workload(r: Rendered, name: str) -> Manifest:
    """A deep copy of a service's rendered Deployment or StatefulSet, to mutate in a negative test."""
    found = [
        d for d in r.docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{r.overlay}: expected one Deployment or StatefulSet {name}, found {len(found)}"
    return copy.deepcopy(found[0])


def test_env_policy_misspelt_variable_is_reported(
    rendered: dict[str, Rendered], tmp_path: pathlib.Path
) -> None:
    r = rendered["dev"]
    doc = service_workload(r, "ingest")
    env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "INGEST_MESH_PEER", "value": "aggregator=aggregator:50052"})
    assert any(
        "INGEST_MESH_PEER is set but its config never reads it" in p for p in env_problems(r, doc, tmp_path)
    )


def test_env_policy_loopback_listen_address_is_reported(
    rendered: dict[str, Rendered], tmp_path: pathlib.Path
) -> None:
    r = rendered["dev"]
    doc = service_workload(r, "aggregator")
    env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
    next(v for v in env if v["name"] == "AGGREGATOR_LISTEN")["value"] = "127.0.0.1:50052"
    assert any("unreachable from other pods" in p for p in env_problems(r, doc, tmp_path))


@pytest.mark.parametrize("stage", SHARDED_STAGES)
def test_env_policy_statefulset_pod_beyond_shard_count_is_reported(
    rendered: dict[str, Rendered], tmp_path: pathlib.Path, stage: str
) -> None:
    # Each pod's own name reaches its config: the third pod of a two-shard set has no shard.
    r = rendered["staging"]
    doc = service_workload(r, stage)
    assert env_problems(r, doc, tmp_path) == []
    doc["spec"]["replicas"] = 3
    assert any(
        "its config does not load" in p and f"'{stage}-2'" in p for p in env_problems(r, doc, tmp_path)
    )


def test_env_policy_unmounted_api_key_file_is_reported(
    rendered: dict[str, Rendered], tmp_path: pathlib.Path
) -> None:
    r = rendered["dev"]
    doc = service_workload(r, "inference")
    doc["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "tmp", "mountPath": "/tmp"}  # noqa: S108 - a path inside the pod
    ]
    assert any("is not a mounted Secret key" in p for p in env_problems(r, doc, tmp_path))


def test_secret_values_rendered_only_inside_secret_object(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        for doc in r.docs:
            if doc["kind"] == "Secret":
                continue
            text = yaml.safe_dump(doc)
            for key, value in r.secret_values.items():
                assert value not in text, (
                    f"{r.overlay}: secret {key} inlined in {doc['kind']}/{doc['metadata']['name']}"
                )


def test_secret_template_keys_match_manifest_references(rendered: dict[str, Rendered]) -> None:
    referenced = set()
    r = rendered["production"]
    secret_name = r.one("Secret", "mt5mesh-secrets")["metadata"]["name"]
    for _, template in workloads(r.docs):
        for volume in template["spec"].get("volumes", []):
            if volume.get("secret", {}).get("secretName") == secret_name:
                referenced |= {i["key"] for i in volume["secret"]["items"]}
        for container in template["spec"]["containers"]:
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    assert ref["name"] == secret_name
                    referenced.add(ref["key"])
    template_text = SECRETS_TEMPLATE.read_text(encoding="utf-8")
    assert set(template_keys(template_text)) == referenced
    # The template itself carries no secret: every value is empty.
    assert all(
        line.strip().endswith("=")
        for line in template_text.splitlines()
        if "=" in line and not line.startswith("#")
    )


def test_secret_files_and_objects_absent_from_git() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "--", "k8s"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [t for t in tracked if t.endswith("secrets.env")]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *(f"k8s/overlays/{o}/secrets.env" for o in OVERLAYS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert ignored == [f"k8s/overlays/{o}/secrets.env" for o in OVERLAYS]
    for path in K8S.rglob("*.yaml"):
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(d, dict)]
        assert not [d for d in docs if d.get("kind") == "Secret"], path


# ---------------------------------------------------------------------------------------------
# Gateway
# ---------------------------------------------------------------------------------------------


def test_gateway_configmap_equals_envoy_config_and_descriptor(rendered: dict[str, Rendered]) -> None:
    envoy_yaml = (REPO / "envoy" / "envoy.yaml").read_bytes()
    descriptor = (REPO / "gen" / "mt5mesh.binpb").read_bytes()
    # The copies kustomize loads; `make k8s-sync` refreshes them.
    assert (K8S / "base" / "gateway" / "envoy.yaml").read_bytes() == envoy_yaml, "run make k8s-sync"
    assert (K8S / "base" / "gateway" / "mt5mesh.binpb").read_bytes() == descriptor, "run make k8s-sync"
    for r in rendered.values():
        config_map = r.one("ConfigMap", "gateway-config")
        assert config_map["data"]["envoy.yaml"].encode() == envoy_yaml
        assert base64.b64decode(config_map["binaryData"]["mt5mesh.binpb"]) == descriptor
        # A ConfigMap holds at most 1 MiB.
        assert len(yaml.safe_dump(config_map).encode()) < 1024 * 1024


def test_gateway_mounts_config_where_envoy_reads_it(rendered: dict[str, Rendered]) -> None:
    envoy = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    listener = envoy["static_resources"]["listeners"][0]
    filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    transcoder = next(f for f in filters if f["name"] == "envoy.filters.http.grpc_json_transcoder")
    descriptor_path = pathlib.PurePosixPath(transcoder["typed_config"]["proto_descriptor"])
    for r in rendered.values():
        deployment = r.one("Deployment", "gateway")
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        config_arg = pathlib.PurePosixPath(container["args"][container["args"].index("-c") + 1])
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(
            m
            for m in container["volumeMounts"]
            if pathlib.PurePosixPath(m["mountPath"]) == descriptor_path.parent
        )
        assert (
            volumes[mount["name"]]["configMap"]["name"]
            == r.one("ConfigMap", "gateway-config")["metadata"]["name"]
        )
        assert config_arg.parent == descriptor_path.parent
        assert config_arg.name == "envoy.yaml"
        assert descriptor_path.name == "mt5mesh.binpb"
        port = listener["address"]["socket_address"]["port_value"]
        listener_ports = {
            one["address"]["socket_address"]["port_value"] for one in envoy["static_resources"]["listeners"]
        }
        assert {p["containerPort"] for p in container["ports"]} == listener_ports
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["tcpSocket"]["port"] == port


def test_envoy_clusters_resolve_to_headless_services_of_serving_pods(rendered: dict[str, Rendered]) -> None:
    envoy = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    internal = {"envoy_admin", "opentelemetry_collector"}  # the admin interface, the tracer's collector
    clusters = [c for c in envoy["static_resources"]["clusters"] if c["name"] not in internal]
    assert {c["name"] for c in clusters} == set(SERVICES)
    for r in rendered.values():
        for cluster in clusters:
            assert cluster["type"] == "STRICT_DNS"
            address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            host, port = address["socket_address"]["address"], address["socket_address"]["port_value"]
            service = r.one("Service", host)
            assert service["spec"].get("clusterIP") == "None", f"{host}: not headless"
            service_port = next(p for p in service["spec"]["ports"] if p["port"] == port)
            assert service_port["name"] == "grpc"
            selector = {"matchLabels": service["spec"]["selector"]}
            pods = [t for _, t in workloads(r.docs) if selects(selector, t["metadata"]["labels"])]
            assert len(pods) == 1
            container_ports = {
                p["name"]: p["containerPort"] for p in pods[0]["spec"]["containers"][0]["ports"]
            }
            assert container_ports[service_port["targetPort"]] == port


def test_envoy_tracer_exports_to_jaeger_otlp_grpc_port(rendered: dict[str, Rendered]) -> None:
    envoy = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    (collector,) = [
        c for c in envoy["static_resources"]["clusters"] if c["name"] == "opentelemetry_collector"
    ]
    address = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    host, port = address["socket_address"]["address"], address["socket_address"]["port_value"]
    for r in rendered.values():
        service_port = next(p for p in r.one("Service", host)["spec"]["ports"] if p["port"] == port)
        assert service_port["name"] == "otlp-grpc"
        assert ("gateway", host, port, "TCP") in allowed_edges(r.docs, r.namespace)


def test_services_target_ports_exist_on_selected_pods(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        for service in (d for d in r.docs if d["kind"] == "Service"):
            pods = [
                t
                for _, t in workloads(r.docs)
                if selects({"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"])
            ]
            assert pods, f"{service['metadata']['name']} selects no pod"
            names = {p.get("name") for t in pods for c in t["spec"]["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names, (service["metadata"]["name"], port)


def test_ingress_terminates_tls_with_cert_manager(rendered: dict[str, Rendered]) -> None:
    hosts = set()
    for r in rendered.values():
        ingress = r.one_of_kind("Ingress")
        assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
        tls_hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
        rule_hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
        assert tls_hosts == rule_hosts
        hosts |= rule_hosts
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend["name"] == "gateway"
    assert len(hosts) == len(OVERLAYS), "each environment needs its own host name"


# ---------------------------------------------------------------------------------------------
# Environments: replicas, autoscaling, disruption budgets, log levels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_replicas_and_log_level_match_environment(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    r = rendered[overlay]
    assert r.one("ConfigMap", "mt5mesh-env")["data"]["LOG_LEVEL"] == LOG_LEVELS[overlay]
    for name in HPA_TARGETS:
        hpa = r.one("HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["spec"]["minReplicas"] == MIN_REPLICAS[overlay]
        assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]
        targets = {
            m["resource"]["name"]: m["resource"]["target"]["averageUtilization"]
            for m in hpa["spec"]["metrics"]
        }
        assert targets == {"cpu": 70, "memory": 80}
        # The HPA owns the count; a replicas field would reset it on every apply.
        assert "replicas" not in r.one("Deployment", name)["spec"]
        pdb = r.one("PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"] == r.one("Deployment", name)["spec"]["selector"]
    assert r.one("StatefulSet", "timescaledb")["spec"]["replicas"] == 1


def test_overlay_mesh_images_same_release_tag(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        tags = {
            c["image"].rsplit(":", 1)[1]
            for _, t in workloads(r.docs)
            for c in t["spec"]["containers"]
            if "/mt5-mesh/" in c["image"]
        }
        assert len(tags) == 1, f"{r.overlay}: the mesh's images come from different releases: {tags}"


# ---------------------------------------------------------------------------------------------
# Sharded stages
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class ShardedConfig(Protocol):
    """What a sharded stage's config says about its shard (AggregatorConfig, IndicatorsConfig)."""

    @property
    def shard_index(self) -> int: ...

    @property
    def shard_count(self) -> int: ...

    @property
    def feed_poll_seconds(self) -> float: ...


def shard_config(stage: str, env: Mapping[str, str]) -> ShardedConfig:
    """A sharded stage's config, read by the service's own ``from_env``."""
    config = CONFIG_READERS[stage](env)
    assert isinstance(config, ShardedConfig), f"{stage}: its config has no shard settings"
    return config


def env_var(container: Manifest, name: str) -> Manifest | None:
    """A container's env entry of that name, or None."""
    return next((v for v in container.get("env", []) if v["name"] == name), None)


def shard_problems(r: Rendered, doc: Manifest) -> list[str]:
    """Everything that keeps a sharded stage's object from running each shard exactly once.

    A StatefulSet (at most one pod per shard identity, even during a rolling update) of Parallel pods
    under the headless Service it names; <PREFIX>_SHARD_COUNT equal to its replicas and
    <PREFIX>_SHARD_INDEX from the pod's name, so that its pods' indices, as the service's own config
    reads them, are exactly 0 … N-1 of N; the 0.2 s feed poll; no HPA (scaling is resharding) and a
    PodDisruptionBudget of one. The stage is the object's name, its prefix from SHARDED_STAGES.
    """
    name = str(doc["metadata"]["name"])
    prefix = SHARDED_STAGES[name]
    where = f"{doc['kind']}/{name}"
    if doc["kind"] != "StatefulSet":
        return [f"{where}: is not a StatefulSet (a pod per shard, never two of one shard)"]
    spec = doc["spec"]
    problems: list[str] = []
    if spec.get("podManagementPolicy") != "Parallel":
        problems.append(f"{where}: podManagementPolicy is not Parallel")
    if spec.get("updateStrategy", {}).get("type", "RollingUpdate") != "RollingUpdate":
        problems.append(f"{where}: updateStrategy is not RollingUpdate")
    services = [
        d for d in r.docs if d["kind"] == "Service" and d["metadata"]["name"] == spec.get("serviceName")
    ]
    if not services or services[0]["spec"].get("clusterIP") != "None":
        problems.append(f"{where}: serviceName {spec.get('serviceName')} is no headless Service")
    replicas = int(spec.get("replicas", 1))
    container = next(c for c in spec["template"]["spec"]["containers"] if c["name"] == name)
    count = (env_var(container, f"{prefix}_SHARD_COUNT") or {}).get("value")
    if count != str(replicas):
        problems.append(f"{where}: {prefix}_SHARD_COUNT is {count!r} but replicas is {replicas}")
    index = env_var(container, f"{prefix}_SHARD_INDEX") or {}
    if index.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        problems.append(f"{where}: {prefix}_SHARD_INDEX is {index}, not the pod's metadata.name")
    layouts = set()
    for pod in pod_names(doc):
        env = container_env(r, container, pod)[0]
        # A stand-in key: the key file is checked by env_problems, the shard settings here.
        env.pop("MT5MESH_API_KEY_FILE", None)
        env["MT5MESH_API_KEY"] = "k" * 16
        try:
            config = shard_config(name, env)
        except ValueError as exc:
            problems.append(f"{where}: pod {pod}: its config does not load: {exc}")
            continue
        layouts.add((config.shard_index, config.shard_count))
        if config.feed_poll_seconds != SHARD_FEED_POLL_SECONDS:
            problems.append(f"{where}: pod {pod}: {prefix}_FEED_POLL_SECONDS is {config.feed_poll_seconds}")
    if layouts and layouts != {(k, replicas) for k in range(replicas)}:
        problems.append(
            f"{where}: its pods run shards {sorted(layouts)}, not each of 0..{replicas - 1} of {replicas}"
        )
    if any(
        d["kind"] == "HorizontalPodAutoscaler" and d["spec"]["scaleTargetRef"]["name"] == name for d in r.docs
    ):
        problems.append(f"{where}: an HPA scales it (changing the shard count is resharding)")
    budgets = [d for d in r.docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == name]
    if (
        not budgets
        or budgets[0]["spec"].get("maxUnavailable") != 1
        or budgets[0]["spec"]["selector"] != spec["selector"]
    ):
        problems.append(f"{where}: no PodDisruptionBudget of maxUnavailable 1 selecting its pods")
    return problems


def test_sharded_stages_are_every_workload_with_a_shard_index(rendered: dict[str, Rendered]) -> None:
    # A stage that gains a shard index must join SHARDED_STAGES, or the checks below would skip it.
    for r in rendered.values():
        with_index = {
            str(doc["metadata"]["name"])
            for doc, template in workloads(r.docs)
            for container in template["spec"]["containers"]
            if any(v["name"].endswith("_SHARD_INDEX") for v in container.get("env", []))
        }
        assert with_index == set(SHARDED_STAGES), r.overlay


@pytest.mark.parametrize("stage", SHARDED_STAGES)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sharded_stage_statefulset_shard_count_equals_replicas(
    rendered: dict[str, Rendered], overlay: str, stage: str
) -> None:
    r = rendered[overlay]
    prefix = SHARDED_STAGES[stage]
    assert not [d for d in r.docs if d["kind"] == "Deployment" and d["metadata"]["name"] == stage]
    statefulset = r.one("StatefulSet", stage)
    assert statefulset["spec"]["replicas"] == SHARDS[overlay]
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert env_var(container, f"{prefix}_SHARD_COUNT") == {
        "name": f"{prefix}_SHARD_COUNT",
        "value": str(SHARDS[overlay]),
    }
    assert shard_problems(r, statefulset) == []


@pytest.mark.parametrize("stage", SHARDED_STAGES)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sharded_stage_index_from_pod_name_each_pod_own_shard(
    rendered: dict[str, Rendered], overlay: str, stage: str, tmp_path: pathlib.Path
) -> None:
    r = rendered[overlay]
    prefix = SHARDED_STAGES[stage]
    statefulset = r.one("StatefulSet", stage)
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert env_var(container, f"{prefix}_SHARD_INDEX") == {
        "name": f"{prefix}_SHARD_INDEX",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    assert pod_names(statefulset) == [f"{stage}-{k}" for k in range(SHARDS[overlay])]
    key_file = tmp_path / "api-keys"
    key_file.write_text(r.secret_values["api-keys"], encoding="utf-8")
    for k, pod in enumerate(pod_names(statefulset)):
        env = container_env(r, container, pod)[0]
        config = shard_config(stage, {**env, "MT5MESH_API_KEY_FILE": str(key_file)})
        assert (config.shard_index, config.shard_count) == (k, SHARDS[overlay])


def scale_to(doc: Manifest, replicas: int) -> None:
    """What ``kubectl scale`` (or an overlay's count without the replacement) does: replicas alone."""
    doc["spec"]["replicas"] = replicas


def set_env(doc: Manifest, name: str, entry: Manifest) -> None:
    """Replace the env entry ``name`` of the workload's (first) container."""
    env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
    env[next(i for i, v in enumerate(env) if v["name"] == name)] = {"name": name, **entry}


@pytest.mark.parametrize("stage", SHARDED_STAGES)
@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (lambda d, p: scale_to(d, 3), "{p}_SHARD_COUNT is '2' but replicas is 3"),
        (lambda d, p: set_env(d, f"{p}_SHARD_COUNT", {"value": "3"}), "but replicas is 2"),
        (lambda d, p: set_env(d, f"{p}_SHARD_INDEX", {"value": "0"}), "not the pod's metadata.name"),
        (lambda d, p: set_env(d, f"{p}_SHARD_INDEX", {"value": "0"}), "not each of 0..1 of 2"),
        (
            lambda d, p: set_env(d, f"{p}_FEED_POLL_SECONDS", {"value": "1.0"}),
            "{p}_FEED_POLL_SECONDS is 1.0",
        ),
        (lambda d, p: d["spec"].pop("podManagementPolicy"), "not Parallel"),
        (lambda d, p: d["spec"].update(serviceName="shards"), "no headless Service"),
        (lambda d, p: d.update(kind="Deployment"), "is not a StatefulSet"),
    ],
    ids=[
        "replicas-drifted",
        "count-drifted",
        "fixed-index",
        "one-shard-twice",
        "slow-poll",
        "ordered-ready",
        "no-service",
        "deployment",
    ],
)
def test_shard_policy_bad_statefulset_is_reported(
    rendered: dict[str, Rendered], mutation: Callable[[Manifest, str], object], expected: str, stage: str
) -> None:
    r = rendered["staging"]
    prefix = SHARDED_STAGES[stage]
    bad = service_workload(r, stage)
    assert shard_problems(r, bad) == []
    mutation(bad, prefix)
    problems = shard_problems(r, bad)
    assert any(expected.format(p=prefix) in p for p in problems), problems


@pytest.mark.parametrize("stage", SHARDED_STAGES)
@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (
            lambda docs, stage: docs.append(
                {
                    "kind": "HorizontalPodAutoscaler",
                    "metadata": {"name": stage},
                    "spec": {
                        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": stage}
                    },
                }
            ),
            "an HPA scales it",
        ),
        (
            lambda docs, stage: docs.remove(
                next(d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == stage)
            ),
            "no PodDisruptionBudget",
        ),
    ],
    ids=["autoscaled", "no-budget"],
)
def test_shard_policy_hpa_or_missing_budget_is_reported(
    rendered: dict[str, Rendered],
    mutation: Callable[[list[Manifest], str], object],
    expected: str,
    stage: str,
) -> None:
    r = rendered["staging"]
    docs = copy.deepcopy(r.docs)
    mutation(docs, stage)
    bad = dataclasses.replace(r, docs=docs)
    problems = shard_problems(bad, bad.one("StatefulSet", stage))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("stage", SHARDED_STAGES)
def test_overlay_without_count_replacement_drift_is_reported(tmp_path: pathlib.Path, stage: str) -> None:
    # Each stage's replacement in the overlay is what keeps its count and its replicas together:
    # without it the staging overlay renders 2 pods that each believe there is 1 shard. The other
    # stage keeps its own replacement and stays right.
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s, ignore=shutil.ignore_patterns("secrets.env"))
    overlay = k8s / "overlays" / "staging"
    values = throwaway_secrets()
    (overlay / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text(encoding="utf-8"))
    replacements = kustomization["replacements"]
    kustomization["replacements"] = [x for x in replacements if x["source"]["name"] != stage]
    assert len(kustomization["replacements"]) == len(replacements) - 1
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    r = Rendered("staging", overlay, render(overlay), values)
    statefulset = r.one("StatefulSet", stage)
    assert statefulset["spec"]["replicas"] == SHARDS["staging"]
    problems = shard_problems(r, statefulset)
    prefix = SHARDED_STAGES[stage]
    assert any(f"{prefix}_SHARD_COUNT is '1' but replicas is 2" in p for p in problems), problems
    assert any(f"{stage}-1" in p and "does not load" in p for p in problems), problems
    for other in SHARDED_STAGES.keys() - {stage}:
        assert shard_problems(r, r.one("StatefulSet", other)) == []


# ---------------------------------------------------------------------------------------------
# Network policies
# ---------------------------------------------------------------------------------------------


def test_network_policies_deny_by_default_and_select_every_pod(rendered: dict[str, Rendered]) -> None:
    for r in rendered.values():
        policies = [d for d in r.docs if d["kind"] == "NetworkPolicy"]
        default = [
            p
            for p in policies
            if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")
        ]
        assert default, "no default-deny policy"
        assert set(default[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        for _, template in workloads(r.docs):
            labels = template["metadata"]["labels"]
            own = [
                p
                for p in policies
                if p["spec"]["podSelector"] != {} and selects(p["spec"]["podSelector"], labels)
            ]
            assert own, f"{r.overlay}: {labels['app.kubernetes.io/name']} has no policy of its own"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_edges_equal_design(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    edges = allowed_edges(r.docs, r.namespace)
    assert sorted(edges - EXPECTED_EDGES) == [], "allowed but not in the design"
    assert sorted(EXPECTED_EDGES - edges) == [], "in the design but denied"


def test_network_policy_missing_rule_detected(rendered: dict[str, Rendered]) -> None:
    r = rendered["production"]
    docs = copy.deepcopy(r.docs)
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "aggregator")
    policy["spec"]["egress"] = [
        e
        for e in policy["spec"]["egress"]
        if e["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] != "ingest"
    ]
    edges = allowed_edges(docs, r.namespace)
    assert ("aggregator", "ingest", 50051, "TCP") not in edges
    assert ("indicators", "aggregator", 50052, "TCP") in edges


def test_network_policy_open_ingress_detected(rendered: dict[str, Rendered]) -> None:
    r = rendered["production"]
    docs = copy.deepcopy(r.docs)
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "timescaledb")
    policy["spec"]["ingress"] = [{}]
    assert ("world", "timescaledb", 5432, "TCP") in allowed_edges(docs, r.namespace) - EXPECTED_EDGES


# ---------------------------------------------------------------------------------------------
# Backup and restore, against the real PostgreSQL server
# ---------------------------------------------------------------------------------------------

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BACKUP_SCRIPT = K8S / "base" / "backup" / "backup.sh"
RESTORE_SCRIPT = K8S / "base" / "backup" / "restore.sh"


@contextlib.contextmanager
def scratch_databases(*names: str) -> Iterator[None]:
    """Drop the named databases before and after (they are this test's own)."""

    def drop() -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    drop()
    try:
        yield
    finally:
        drop()


def run_script(script: pathlib.Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a backup script with sh, as the CronJob does, against the local server."""
    for tool in ("pg_dump", "pg_restore", "psql", "createdb", "dropdb"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH (PostgreSQL client tools)")
    base = {"PATH": str(pathlib.Path(shutil.which("pg_dump") or "").parent) + ":/usr/bin:/bin"}
    connection = {"PGHOST": "127.0.0.1", "PGPORT": "5432", "PGUSER": "postgres"}
    return subprocess.run(
        ["sh", str(script)],
        env={**base, **connection, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def make_source(name: str) -> None:
    """A database with one table and one row."""
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}", autocommit=True) as conn:
        conn.execute("CREATE TABLE candles (symbol text PRIMARY KEY, close double precision NOT NULL)")
        conn.execute("INSERT INTO candles VALUES ('EURUSD', 1.0856)")


def rows(name: str) -> list[tuple[Any, ...]]:
    """The rows of the restored table."""
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}") as conn:
        return conn.execute("SELECT symbol, close FROM candles").fetchall()


@pytest.mark.postgres
def test_backup_then_restore_into_new_database_row_present(tmp_path: pathlib.Path) -> None:
    source, target = "k8s_backup_src", "k8s_backup_restored"
    with scratch_databases(source, target):
        make_source(source)
        backup = run_script(BACKUP_SCRIPT, PGDATABASE=source, BACKUP_DIR=str(tmp_path), BACKUP_KEEP="7")
        assert backup.returncode == 0, backup.stderr
        dumps = sorted(tmp_path.glob(f"{source}-*.dump"))
        assert len(dumps) == 1
        assert not list(tmp_path.glob(".*partial"))
        restore = run_script(
            RESTORE_SCRIPT, PGDATABASE=source, BACKUP_DIR=str(tmp_path), RESTORE_DATABASE=target
        )
        assert restore.returncode == 0, restore.stderr
        assert rows(target) == [("EURUSD", 1.0856)]


@pytest.mark.postgres
def test_restore_into_existing_database_refused_and_left_unchanged(tmp_path: pathlib.Path) -> None:
    source, existing = "k8s_restore_src", "k8s_restore_existing"
    with scratch_databases(source, existing):
        make_source(source)
        assert run_script(BACKUP_SCRIPT, PGDATABASE=source, BACKUP_DIR=str(tmp_path)).returncode == 0
        make_source(existing)
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{existing}", autocommit=True) as conn:
            conn.execute("UPDATE candles SET close = 2.0")
        restore = run_script(
            RESTORE_SCRIPT, PGDATABASE=source, BACKUP_DIR=str(tmp_path), RESTORE_DATABASE=existing
        )
        assert restore.returncode != 0
        assert "already exists" in restore.stderr
        assert rows(existing) == [("EURUSD", 2.0)]


@pytest.mark.postgres
def test_restore_damaged_dump_fails_before_creating_database(tmp_path: pathlib.Path) -> None:
    target = "k8s_restore_damaged"
    with scratch_databases(target):
        damaged = tmp_path / "mt5mesh-20250101T000000Z.dump"
        damaged.write_bytes(b"PGDMP but cut short")
        restore = run_script(RESTORE_SCRIPT, RESTORE_FILE=str(damaged), RESTORE_DATABASE=target)
        assert restore.returncode != 0
        with psycopg.connect(PG_ADMIN) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,)).fetchall()
        assert found == []


@pytest.mark.postgres
def test_backup_retention_keeps_newest_dumps(tmp_path: pathlib.Path) -> None:
    source = "k8s_backup_retention"
    old = ["20240101T000000Z", "20240102T000000Z", "20240103T000000Z"]
    for stamp in old:
        (tmp_path / f"{source}-{stamp}.dump").write_bytes(b"old")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("kept", encoding="utf-8")
    with scratch_databases(source):
        make_source(source)
        result = run_script(BACKUP_SCRIPT, PGDATABASE=source, BACKUP_DIR=str(tmp_path), BACKUP_KEEP="2")
        assert result.returncode == 0, result.stderr
    kept = sorted(p.name for p in tmp_path.glob(f"{source}-*.dump"))
    assert len(kept) == 2
    assert kept[0] == f"{source}-{old[-1]}.dump"
    assert unrelated.exists()


def test_readme_deploy_and_restore_commands_documented() -> None:
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    assert "kubectl apply --server-side -k k8s/overlays/production" in readme
    assert "create job --from=cronjob/db-restore" in readme
    assert "create job --from=cronjob/db-backup" in readme
    assert "secrets.env.example" in readme
    assert 'scale statefulset/"$STAGE" --replicas=0' in readme
    for stage in SHARDED_STAGES:
        assert f"statefulset/{stage}" in readme
    assert "mt5mesh up --shards 2" in readme
    assert "tests/integration/test_aggregator_shards.py" in readme
