"""The container and cluster files: what can be checked without Docker or a cluster.

Every manifest under deploy/k8s validates against the Kubernetes API schemas (strict: an
unknown or misspelt field fails), offline, with kubernetes-validate. The probes point at the
HTTP plane's routes by port names that exist; names, labels and selectors line up across the
manifests; the single box (deploy/k8s/single) and the split roles (deploy/k8s/cluster: ingest,
workers, the Redis store) run what they say; every environment name is one facecast reads;
compose's `cluster` profile matches the Kubernetes roles; the image installs what
scripts/setup installs, checks the models at build time and fetches nothing at run time.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import typing
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from facecast.config import ModelSettings, StreamSettings
from facecast.serve.app import METRICS_KEYS_ENV

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
SINGLE = K8S / "single"
CLUSTER = K8S / "cluster"
OPTIONAL = CLUSTER / "optional"
COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
LABEL = {"app.kubernetes.io/name": "facecast"}
COMPONENT = "app.kubernetes.io/component"
# The Kubernetes version the manifests are validated against: the newest whose schemas
# kubernetes-validate 1.37 bundles.
K8S_VERSION = "1.37.0"
# FACECAST_* names read with os.environ rather than through a settings class or a CLI option:
# the HTTP plane's token and how /metrics labels streams (server.METRICS_KEYS_ENV).
SERVICE_ENV = {"FACECAST_API_TOKEN", METRICS_KEYS_ENV}
SEED_ENV = {"SOURCE_IMAGE": "source_image", "TARGET_STREAM": "input", "OUTPUT_STREAM": "output"}
# Names the deployment files use that facecast never reads: the store's password, spliced
# into FACECAST_STORE ($(STORE_PASSWORD) in Kubernetes, ${STORE_PASSWORD} in compose) and
# given to Redis.
DEPLOY_ONLY_ENV = {"STORE_PASSWORD"}
# HPA: no change while |current/target - 1| <= 0.1 (the controller's default tolerance).
HPA_TOLERANCE = 0.1


# ---------------------------------------------------------------------------------- helpers


def k8s_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


@functools.cache
def _docs_of(path: Path) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def k8s_docs(folder: Path = K8S) -> list[dict]:
    """Every document under ``folder`` (read-only: they are cached; deep-copy to change)."""
    return [doc for path in k8s_files() if path.is_relative_to(folder) for doc in _docs_of(path)]


def only(kind: str, name: str | None = None, folder: Path = K8S) -> dict:
    found = [
        d for d in k8s_docs(folder) if d["kind"] == kind and name in (None, d["metadata"]["name"])
    ]
    where = folder.relative_to(REPO)
    assert len(found) == 1, f"expected one {kind} {name or ''} in {where}, found {len(found)}"
    return found[0]


def workloads(folder: Path = K8S) -> list[dict]:
    return [d for d in k8s_docs(folder) if d["kind"] in ("Deployment", "StatefulSet")]


def deployment() -> dict:
    """The single box's Deployment (`serve`, role all)."""
    return only("Deployment", folder=SINGLE)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def container(workload: dict) -> dict:
    (one,) = pod_spec(workload)["containers"]
    return one


def containers() -> list[dict]:
    return pod_spec(deployment())["containers"]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def env_value(c: dict, name: str) -> str:
    return env_of(c)[name]["value"]


def secret_ref(c: dict, name: str) -> tuple[str, str]:
    ref = env_of(c)[name]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def facecast_workloads() -> list[dict]:
    return [w for w in workloads() if container(w)["image"].startswith("facecast:")]


def ingest() -> dict:
    return only("Deployment", "facecast-ingest", CLUSTER)


def cpu_worker() -> dict:
    return only("Deployment", "facecast-worker", CLUSTER)


def gpu_worker() -> dict:
    return only("Deployment", "facecast-worker-gpu", OPTIONAL)


def worker_deployments() -> list[dict]:
    return [cpu_worker(), gpu_worker()]


def store() -> dict:
    return only("StatefulSet", "facecast-store", CLUSTER)


def store_service() -> dict:
    return only("Service", store()["spec"]["serviceName"], CLUSTER)


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions) or a Service's plain selector."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if selector.get("matchLabels", {}).items() - labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def selected(selector: dict) -> list[str]:
    """The workloads whose pods ``selector`` matches, by name."""
    return sorted(w["metadata"]["name"] for w in workloads() if selects(selector, pod_labels(w)))


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number: "2" -> 2, "800m" -> 0.8, "2Gi" -> 2 * 2**30."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, scale in sorted(suffixes.items(), key=lambda s: -len(s[0])):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * scale
    return float(text)


def capacity_of(workload: dict) -> int:
    return int(env_value(container(workload), "FACECAST_CAPACITY"))


def hpa_for(workload: dict) -> dict:
    name = workload["metadata"]["name"]
    found = [
        d
        for d in k8s_docs()
        if d["kind"] == "HorizontalPodAutoscaler" and d["spec"]["scaleTargetRef"]["name"] == name
    ]
    assert len(found) == 1, f"expected one HPA on {name}, found {len(found)}"
    return found[0]


def kubernetes_validate() -> typing.Any:
    """The kubernetes_validate module (the dev extra), or a failure that says how to get it."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: run scripts/setup (the dev extra)")
    return kubernetes_validate


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", "NAME"]
        return dict([*item.split("=", 1), None][:2] for item in env)
    return env


def compose_command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else command


def interpolate_default(value: str) -> str:
    """``${NAME:-default}`` → ``default``, as compose does with NAME unset."""
    match = re.fullmatch(r"\$\{(\w+):?-([^}]*)\}", value)
    assert match, f"{value!r}: expected ${{NAME:-default}}"
    return match.group(2)


def is_facecast_service(service: dict) -> bool:
    return str(service.get("image", "")).startswith("facecast")


def facecast_reads() -> set[str]:
    """Every environment name facecast reads: its settings classes' fields (with their
    aliases), every CLI option's envvar, and the names read with os.environ."""
    import click
    import typer.main
    from pydantic import AliasChoices
    from pydantic_settings import BaseSettings

    from facecast import config
    from facecast.cli import app

    names = set(SERVICE_ENV)
    for obj in vars(config).values():
        if not (isinstance(obj, type) and issubclass(obj, BaseSettings)) or obj is BaseSettings:
            continue
        prefix = obj.model_config.get("env_prefix", "")
        for field_name, field in obj.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names |= {c.upper() for c in alias.choices if isinstance(c, str)}
            elif isinstance(alias, str):
                names.add(alias.upper())
            else:
                names.add(f"{prefix}{field_name}".upper())

    def walk(command: click.Command) -> None:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return names


def env_names_everywhere() -> set[str]:
    names = set()
    for workload in facecast_workloads():
        names |= {e["name"] for c in pod_spec(workload)["containers"] for e in c.get("env", [])}
    for service in compose()["services"].values():
        if is_facecast_service(service):
            names |= set(compose_env(service))
    names |= set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    # and any FACECAST_* name mentioned anywhere, comments and the doc included
    for path in [*k8s_files(), COMPOSE, DOCKERFILE, DEPLOY_DOC]:
        names |= set(re.findall(r"\bFACECAST_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    return names


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            joined += line[:-1] + " "
            continue
        lines.append(joined + line)
        joined = ""
    assert not joined, "Dockerfile ends in a line continuation"
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def instructions(name: str) -> list[str]:
    return [args for inst, args in dockerfile() if inst == name]


def build_args() -> dict[str, str]:
    """ARG name -> default ("" when it has none)."""
    pairs = ([*a.split("=", 1), ""][:2] for a in instructions("ARG"))
    return {name: default.strip('"') for name, default in pairs}


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args!r}: use the JSON (exec) form"
    return value


# ---------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", [*k8s_files(), COMPOSE], ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    if path.is_relative_to(K8S):
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["metadata"].get("labels", {}).items() >= LABEL.items(), (
                f"{path}: {doc['kind']} lacks the label {LABEL}"
            )


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    kv = kubernetes_validate()
    for doc in _docs_of(path):
        where = f"{path.relative_to(REPO)}: {doc['kind']} {doc['metadata']['name']}"
        try:
            kv.validate(copy.deepcopy(doc), K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            at = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {at}: {exc.message} (Kubernetes {exc.version}, strict)")
        except kv.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")


def test_strict_validation_catches_mistakes() -> None:
    """The validator is not a no-op: a misspelt field and a wrong type both fail."""
    kv = kubernetes_validate()
    from kubernetes_validate.utils import all_versions

    assert K8S_VERSION in all_versions(), f"bundled: {all_versions()[-3:]}"
    misspelt = copy.deepcopy(cpu_worker())
    container(misspelt)["terminationGracePeriodSecond"] = 30
    wrong_type = copy.deepcopy(cpu_worker())
    wrong_type["spec"]["replicas"] = "two"
    for doc in (misspelt, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(doc, K8S_VERSION, strict=True)


def test_layout_and_kinds() -> None:
    kinds = {d["kind"] for d in k8s_docs()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds
    assert {d["kind"] for d in k8s_docs(SINGLE)} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
    }
    cluster = {d["kind"] for d in k8s_docs(CLUSTER)}
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler"} <= cluster
    assert {"PodDisruptionBudget", "NetworkPolicy"} <= cluster
    # `kubectl apply -f deploy/k8s/single/` (or cluster/) must never apply a placeholder
    # Secret over the real one
    for folder in (SINGLE, CLUSTER, OPTIONAL):
        assert not [d for d in k8s_docs(folder) if d["kind"] == "Secret"], folder


def test_names_are_unique_per_kind() -> None:
    seen: dict[tuple[str, str], int] = {}
    for doc in k8s_docs():
        key = (doc["kind"], doc["metadata"]["name"])
        seen[key] = seen.get(key, 0) + 1
    assert not [k for k, n in seen.items() if n > 1], seen


# ---------------------------------------------------------------------------------- Kubernetes


def test_workloads_select_their_own_pods_only() -> None:
    for workload in workloads():
        selector = workload["spec"]["selector"]
        assert selected(selector) == [workload["metadata"]["name"]], (
            f"{workload['metadata']['name']}: its selector also takes {selected(selector)}"
        )
        assert pod_labels(workload).items() >= LABEL.items()


def test_selectors_pick_the_intended_workloads() -> None:
    expected = {
        ("Service", "facecast"): ["facecast"],
        ("Service", "facecast-pods"): ["facecast"],
        ("Service", "facecast-ingest"): ["facecast-ingest"],
        ("Service", "facecast-ingest-public"): ["facecast-ingest"],
        ("Service", "facecast-store"): ["facecast-store"],
        ("PodDisruptionBudget", "facecast-worker"): ["facecast-worker"],
        ("PodDisruptionBudget", "facecast-worker-gpu"): ["facecast-worker-gpu"],
        ("NetworkPolicy", "facecast-store"): ["facecast-store"],
    }
    found = {}
    for doc in k8s_docs():
        kind = doc["kind"]
        if kind in ("Service", "PodDisruptionBudget"):
            found[kind, doc["metadata"]["name"]] = selected(doc["spec"]["selector"])
        elif kind == "NetworkPolicy":
            found[kind, doc["metadata"]["name"]] = selected(doc["spec"]["podSelector"])
    assert found == expected


def test_probes_point_at_health_routes_by_existing_port_names() -> None:
    for workload in facecast_workloads():
        for c in pod_spec(workload)["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports.get("http") == 8080, ports
            live = c["livenessProbe"]["httpGet"]
            ready = c["readinessProbe"]["httpGet"]
            assert live["path"] == "/healthz"
            assert ready["path"] == "/readyz"
            startup = c.get("startupProbe", {}).get("httpGet")
            for probe in (live, ready, *([startup] if startup else [])):
                assert probe["port"] in ports, f"probe port {probe['port']!r} not in {list(ports)}"


def test_dependent_env_vars_are_defined_before_use() -> None:
    """Kubernetes expands $(NAME) in env values, command and args only from env entries
    defined earlier in the same container; anything else stays a literal "$(NAME)"."""
    for workload in workloads():
        for c in pod_spec(workload)["containers"]:
            defined: list[str] = []
            for entry in c.get("env", []):
                for name in re.findall(r"\$\((\w+)\)", entry.get("value", "")):
                    assert name in defined, f"{c['name']}: {entry['name']} uses $({name})"
                defined.append(entry["name"])
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for name in re.findall(r"\$\((\w+)\)", arg):
                    assert name in defined, f"{workload['metadata']['name']}: $({name})"
            for name in set(defined) & DEPLOY_ONLY_ENV:
                used = " ".join([*(e.get("value", "") for e in c["env"]), *c.get("args", [])])
                assert f"$({name})" in used, f"{name} is set but never spliced in"


def test_security_context() -> None:
    user = instructions("USER")[-1].split(":")[0]
    for workload in workloads():
        pod = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        if workload in facecast_workloads():
            assert str(pod["securityContext"]["runAsUser"]) == user, name
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "hostPort" not in str(c.get("ports")), name
            assert "cpu" not in c["resources"].get("limits", {}), f"{name}: CPU limit throttles"


# --- the single box: `serve` (role all) --------------------------------------------------


def test_deployment_runs_serve_with_requested_resources() -> None:
    (c,) = containers()
    assert c["args"] == ["serve"]
    assert "command" not in c, "keep the image's ENTRYPOINT (facecast)"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "rtmp": 1935, "hls": 8088}
    requests = c["resources"]["requests"]
    assert str(requests["cpu"]) == "2" and requests["memory"] == "2Gi"


def test_deployment_env_token_from_secret_and_profiles_from_configmap() -> None:
    (c,) = containers()
    env = env_of(c)
    secret_name, key = secret_ref(c, "FACECAST_API_TOKEN")
    secret = only("Secret", secret_name)
    assert key in secret.get("stringData", secret.get("data", {}))

    profiles_path = Path(env["FACECAST_PROFILES"]["value"])
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(deployment())["volumes"]}
    holders = [name for name, m in mounts.items() if profiles_path.parent == Path(m["mountPath"])]
    assert len(holders) == 1, f"no volume mounted at {profiles_path.parent}"
    configmap = only("ConfigMap", volumes[holders[0]]["configMap"]["name"])
    assert profiles_path.name in configmap["data"]


def test_profiles_example_is_key_to_profile_with_valid_options() -> None:
    from facecast.faces.select import Selection
    from facecast.swap.blend import BlendMode

    profiles = yaml.safe_load(only("ConfigMap", "facecast-profiles")["data"]["profiles.yaml"])
    assert isinstance(profiles, dict) and profiles
    for key, profile in profiles.items():
        assert re.fullmatch(r"[A-Za-z0-9_-]+", key), f"stream key {key!r}"
        assert set(profile) == {"source", "faces", "blend"}, key
        assert Path(profile["source"]).is_absolute()
        Selection.parse(profile["faces"])  # raises on a bad selection
        assert profile["blend"] in typing.get_args(BlendMode)


def test_hpa_targets_the_deployment_on_streams_per_pod() -> None:
    hpa = only("HorizontalPodAutoscaler", folder=SINGLE)
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
    assert ref["name"] == deployment()["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "facecast_streams_active"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 10


def test_services_select_the_deployment_pods_by_port_names() -> None:
    spec = deployment()["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for c in containers() for p in c["ports"]}
    services = [d for d in k8s_docs(SINGLE) if d["kind"] == "Service"]
    assert any(s["metadata"]["name"] == "facecast" for s in services)
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), service["metadata"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert {"http", "rtmp", "hls"} <= ports.keys()
        assert ports["http"]["port"] == 8080 and ports["rtmp"]["port"] == 1935
        assert ports["hls"]["port"] == 8088
        for port in ports.values():
            assert port["targetPort"] in port_names


# --- the cluster: ingest, workers, store ---------------------------------------------------


def test_each_role_runs_serve_with_its_role() -> None:
    for workload, role in [(ingest(), "ingest"), *((w, "worker") for w in worker_deployments())]:
        c = container(workload)
        assert c["args"] == ["serve", "--role", role], workload["metadata"]["name"]
        assert "command" not in c, "keep the image's ENTRYPOINT (facecast)"
        assert "FACECAST_ROLE" not in env_of(c), "the role is in args; one place only"
        assert pod_labels(workload)[COMPONENT] == role


def test_ingest_and_workers_reach_the_store_service() -> None:
    service = store_service()
    (port,) = service["spec"]["ports"]
    store_ports = {p["name"]: p["containerPort"] for p in container(store())["ports"]}
    assert store_ports[port["targetPort"]] == port["port"] == 6379
    for workload in [ingest(), *worker_deployments()]:
        c = container(workload)
        url = urlsplit(env_value(c, "FACECAST_STORE"))
        name = workload["metadata"]["name"]
        assert url.scheme in ("redis", "rediss"), name
        # the Service's DNS name: short, or qualified with a namespace
        host = url.hostname or ""
        assert host.split(".")[0] == service["metadata"]["name"], f"{name}: {host}"
        assert url.port == port["port"], name
        # the password: the store's own, from its Secret, spliced in by Kubernetes
        assert url.password == "$(STORE_PASSWORD)", name
        assert secret_ref(c, "STORE_PASSWORD") == secret_ref(container(store()), "STORE_PASSWORD")
    secret_name, key = secret_ref(container(store()), "STORE_PASSWORD")
    assert key in only("Secret", secret_name)["stringData"]


def test_ingest_is_one_recreated_pod_behind_a_service_with_rtmp_hls_http() -> None:
    spec = ingest()["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}, "never two ingests at once"
    assert pod_spec(ingest())["terminationGracePeriodSeconds"] == 30
    c = container(ingest())
    pod_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert pod_ports == {"http": 8080, "rtmp": 1935, "hls": 8088}
    service = only("Service", "facecast-ingest", CLUSTER)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports.keys() == {"rtmp", "hls", "http"}
    for name, port in ports.items():
        assert port["targetPort"] in pod_ports, f"{name}: no port {port['targetPort']!r} on the pod"
        assert port["port"] == pod_ports[port["targetPort"]] == pod_ports[name]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "keep 8080 inside"
    assert service["spec"]["publishNotReadyAddresses"] is True, "the only ingest, ready or not"
    # workers reach the ingest's RTMP port by the name it advertises: this Service
    assert env_value(c, "FACECAST_ADVERTISE") == service["metadata"]["name"]
    assert secret_ref(c, "FACECAST_API_TOKEN")[0] == "facecast-api"
    public = only("Service", "facecast-ingest-public", OPTIONAL)
    assert {p["name"] for p in public["spec"]["ports"]} == {"rtmp", "hls"}, "no API outside"


def test_ingest_loads_the_profiles_file() -> None:
    c = container(ingest())
    profiles_path = Path(env_value(c, "FACECAST_PROFILES"))
    mounts = {Path(m["mountPath"]): m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(ingest())["volumes"]}
    configmap = only("ConfigMap", volumes[mounts[profiles_path.parent]]["configMap"]["name"])
    assert profiles_path.name in configmap["data"]


def test_workers_have_no_rtmp_or_hls_port() -> None:
    for workload in worker_deployments():
        c = container(workload)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 8080}, f"{workload['metadata']['name']}: {ports}"
        assert "FACECAST_ADVERTISE" not in env_of(c) and "FACECAST_PROFILES" not in env_of(c)


def test_worker_requests_match_its_capacity_and_it_drains() -> None:
    workload = cpu_worker()
    capacity = capacity_of(workload)
    assert capacity >= 1
    requests = container(workload)["resources"]["requests"]
    # one 720p30 stream per CPU (facecast bench capacity, docs/benchmarks.md)
    assert quantity(requests["cpu"]) == capacity
    assert quantity(requests["memory"]) == 2**30 * capacity
    for w in worker_deployments():
        assert pod_spec(w)["terminationGracePeriodSeconds"] == 30, "SIGTERM drains"
        assert w["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("which", ["facecast-worker", "facecast-worker-gpu"])
def test_worker_hpa_scales_on_streams_per_worker_below_capacity(which: str) -> None:
    workload = cpu_worker() if which == "facecast-worker" else gpu_worker()
    hpa = hpa_for(workload)
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", which)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "facecast_streams_active"
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    # Workers never run more than their capacity, so the average cannot pass it: a target at
    # the capacity would leave a cluster of full workers as it is, with keys waiting. Full
    # workers must read above the target by more than the HPA's tolerance.
    capacity = capacity_of(workload)
    assert capacity / quantity(target["averageValue"]) > 1 + HPA_TOLERANCE, target
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"] >= 1
    if which == "facecast-worker":
        assert hpa["spec"]["minReplicas"] >= 2, "a spare for a dead worker's keys"


def test_pdbs_cover_the_workers_and_not_the_single_replicas() -> None:
    pdbs = [d for d in k8s_docs() if d["kind"] == "PodDisruptionBudget"]
    covered = {name for pdb in pdbs for name in selected(pdb["spec"]["selector"])}
    assert covered == {"facecast-worker", "facecast-worker-gpu"}
    for pdb in pdbs:
        # one worker at a time, and never none: minAvailable, or maxUnavailable 0, on a
        # Deployment scaled to one would block every node drain
        assert pdb["spec"].keys() == {"maxUnavailable", "selector"}, pdb["metadata"]["name"]
        assert pdb["spec"]["maxUnavailable"] == 1
    # the ingest and the store are one replica by design: no PDB (docs/deploy.md says why)
    assert ingest()["spec"]["replicas"] == store()["spec"]["replicas"] == 1
    assert not covered & {"facecast-ingest", "facecast-store"}


def test_gpu_worker_requests_a_gpu_and_runs_cuda_first(monkeypatch: pytest.MonkeyPatch) -> None:
    workload = gpu_worker()
    c = container(workload)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"] != container(cpu_worker())["image"], "the GPU image, not the CPU one"
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    for name in list(env):
        if name in ModelSettings.model_fields or name.startswith("FACECAST_"):
            monkeypatch.setenv(name, env[name])
    settings = ModelSettings()
    assert settings.execution_providers[0] == "cuda", settings.execution_providers
    # GPU providers apply to ONNX files only: the models folder must be mounted
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(settings.models_dir) in mounts
    # the same role as the CPU worker, on the same store
    assert c["args"] == container(cpu_worker())["args"]
    cpu_store = env_value(container(cpu_worker()), "FACECAST_STORE")
    assert env_value(c, "FACECAST_STORE") == cpu_store


def test_store_is_redis_with_appendonly_on_a_claimed_volume() -> None:
    sts = store()
    assert sts["spec"]["replicas"] == 1
    c = container(sts)
    assert c["image"].split(":")[0] == "redis" and c["image"].split(":")[1].startswith("7")
    args = c["args"]
    assert args[0] == "redis-server"
    pairs = dict(zip(args[1::2], args[2::2], strict=True))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--requirepass"] == "$(STORE_PASSWORD)"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == pairs["--dir"] == "/data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) > 0
    assert store_service()["spec"]["clusterIP"] == "None"  # the StatefulSet's governing one


def test_store_network_policy_admits_only_ingest_and_workers() -> None:
    policy = only("NetworkPolicy", "facecast-store", CLUSTER)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source.keys() == {"podSelector"}, "pods of this namespace only"
    admitted = selected(source["podSelector"])
    assert admitted == ["facecast-ingest", "facecast-worker", "facecast-worker-gpu"]
    (port,) = rule["ports"]
    store_ports = {p["name"]: p["containerPort"] for p in container(store())["ports"]}
    assert store_ports.get(port["port"], port["port"]) == 6379, port


def test_k8s_facecast_env_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for workload in facecast_workloads():
        for name in [n for n in os.environ if n.startswith("FACECAST_")]:
            monkeypatch.delenv(name)
        c = container(workload)
        for entry in c.get("env", []):
            if entry["name"].startswith("FACECAST_") and "value" in entry:
                monkeypatch.setenv(entry["name"], entry["value"])
        StreamSettings()  # raises on a value a field cannot take
        if "FACECAST_CAPACITY" in env_of(c):
            assert capacity_of(workload) >= 1


# ---------------------------------------------------------------------------------- docs


def test_doc_paths_exist() -> None:
    """Every deploy/k8s path the docs and files name exists (the layout moved once)."""
    texts = {p: p.read_text() for p in [DEPLOY_DOC, REPO / "README.md", COMPOSE, DOCKERFILE]}
    for path, text in texts.items():
        for ref in re.findall(r"deploy/k8s/[\w./-]*", text):
            assert (REPO / ref.rstrip(".")).exists(), f"{path.name}: {ref}"
    for path in k8s_files():
        for ref in re.findall(r"(?<![\w/])((?:\.\./|optional/)[\w./-]+\.yaml)", path.read_text()):
            assert (path.parent / ref).exists(), f"{path.relative_to(REPO)}: {ref}"


def test_doc_kubectl_apply_never_applies_the_example_secret() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", DEPLOY_DOC.read_text(), re.S)
    commands = [c for b in blocks for c in re.findall(r"kubectl apply[^\n]*(?:\\\n[^\n]*)*", b)]
    assert len(commands) >= 2, "the single box's and the cluster's"
    for command in commands:
        if "--dry-run" in command:
            continue
        for target in re.findall(r"-f\s+(\S+)", command):
            if target == "-":
                continue
            path = REPO / target
            assert path.exists(), target
            applied = [path] if path.is_file() else sorted(path.glob("*.yaml"))
            assert all("secret.example" not in p.name for p in applied), command


# ---------------------------------------------------------------------------------- compose


def test_compose_runs_the_seed_one_liner() -> None:
    services = compose()["services"]
    stream = services["facecast"]
    assert stream["command"] in (["stream"], "stream")
    assert "profiles" not in stream, "the one-liner must start with a plain `docker compose up`"
    assert SEED_ENV.keys() <= compose_env(stream).keys()
    assert stream["build"] == "." and DOCKERFILE.is_file()
    assert "./examples:/faces:ro" in stream["volumes"]


def test_compose_defaults_exist_in_the_mounted_folder() -> None:
    env = compose_env(compose()["services"]["facecast"])
    for name in ("SOURCE_IMAGE", "TARGET_STREAM"):
        default = interpolate_default(env[name])
        if default.startswith("/faces/"):
            assert (REPO / "examples" / default.removeprefix("/faces/")).is_file(), default


def test_compose_serve_is_behind_a_profile() -> None:
    serve = compose()["services"]["serve"]
    assert serve["profiles"] == ["service"]
    assert serve["command"] in (["serve"], "serve")
    published = {str(p).split(":")[-1] for p in serve["ports"]}
    assert {"1935", "8080", "8088"} <= published
    assert "FACECAST_API_TOKEN" in compose_env(serve)


def test_compose_file_is_compose_v2() -> None:
    data = compose()
    assert "version" not in data, "Compose v2: no top-level version"
    # compose interpolates every service before it applies profiles: a required variable
    # (${VAR:?...}) would stop even the plain one-liner when it is unset
    text = COMPOSE.read_text()
    assert not re.search(r"(?<!\$)\$\{\w+:?\?", text), "no ${VAR:?} in compose.yaml"


def test_compose_cluster_profile_runs_store_ingest_and_workers() -> None:
    data = compose()
    services = data["services"]
    cluster = {n for n, s in services.items() if "cluster" in s.get("profiles", [])}
    assert cluster == {"store", "ingest", "worker"}
    for name in cluster:
        assert services[name]["profiles"] == ["cluster"], name

    store_service = services["store"]
    assert store_service["image"].split(":")[0] == "redis"
    assert store_service["image"].split(":")[1].startswith("7")
    command = " ".join(compose_command(store_service))
    assert re.search(r"redis-server .*--appendonly yes", command), command
    assert "--requirepass" in command
    volume = next(v for v in store_service["volumes"] if v.split(":")[1] == "/data")
    assert volume.split(":")[0] in data["volumes"], "a named volume for the append-only file"
    assert "ports" not in store_service, "Redis stays off the host's ports"

    ingest_service, worker_service = services["ingest"], services["worker"]
    assert compose_command(ingest_service) == ["serve", "--role", "ingest"]
    assert compose_command(worker_service) == ["serve", "--role", "worker"]
    for service in (ingest_service, worker_service):
        env = compose_env(service)
        url = urlsplit(env["FACECAST_STORE"])
        assert url.scheme == "redis" and url.hostname == "store" and url.port == 6379
        assert url.password == "${STORE_PASSWORD:-}", "the store's password, from the host"
        assert env["FACECAST_API_TOKEN"] is None, "passed through from the host"
        assert service["depends_on"]["store"]["condition"] == "service_healthy"
        assert service["stop_grace_period"] == "30s"
        assert is_facecast_service(service) and service["build"] == "."
    assert "STORE_PASSWORD" in compose_env(store_service)
    assert "$$STORE_PASSWORD" in command, "the store takes the same password"

    ingest_env = compose_env(ingest_service)
    assert ingest_env["FACECAST_ADVERTISE"] == "ingest"
    published = {str(p).split(":")[-1] for p in ingest_service["ports"]}
    assert published == {"1935", "8088", "8080"}
    # `--scale worker=N`: nothing that two copies could not share
    assert "ports" not in worker_service and "container_name" not in worker_service
    capacity = interpolate_default(compose_env(worker_service)["FACECAST_CAPACITY"])
    assert int(capacity) >= 1


def test_compose_roles_match_kubernetes() -> None:
    services = compose()["services"]
    assert compose_command(services["ingest"]) == container(ingest())["args"]
    assert compose_command(services["worker"]) == container(cpu_worker())["args"]
    k8s_capacity = env_value(container(cpu_worker()), "FACECAST_CAPACITY")
    assert interpolate_default(compose_env(services["worker"])["FACECAST_CAPACITY"]) == k8s_capacity


def test_compose_config_with_docker_compose() -> None:
    """`docker compose config` where Compose v2 is installed (not on every machine)."""
    if not shutil.which("docker"):
        pytest.skip("docker is not installed")
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("docker compose (v2) is not installed")
    env = {**os.environ, "STORE_PASSWORD": "x", "FACECAST_API_TOKEN": "x"}
    result = subprocess.run(
        ["docker", "compose", "--profile", "cluster", "--profile", "service", "config", "-q"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------- env names


def test_seed_env_names_reach_stream_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose_env(compose()["services"]["facecast"])
    for name in ("FACECAST_SOURCE_IMAGE", "FACECAST_INPUT", "FACECAST_OUTPUT"):
        monkeypatch.delenv(name, raising=False)  # these would win over the seed's names
    values = {name: interpolate_default(env[name]) for name in SEED_ENV}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = StreamSettings()
    assert settings.source_image == Path(values["SOURCE_IMAGE"])
    assert settings.input == values["TARGET_STREAM"]
    assert settings.output == values["OUTPUT_STREAM"]


def test_every_facecast_env_name_is_read_by_facecast() -> None:
    reads = facecast_reads()
    assert {"FACECAST_PROFILES", "FACECAST_EXECUTION_PROVIDERS", *SEED_ENV} <= reads
    unknown = sorted(name for name in env_names_everywhere() if name not in reads | DEPLOY_ONLY_ENV)
    assert not unknown, f"facecast reads no such variable: {', '.join(unknown)}"
    assert not DEPLOY_ONLY_ENV & reads, "a deploy-only name that facecast reads after all"


def test_compose_facecast_env_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose_env(compose()["services"]["facecast"])
    for name, value in env.items():
        if name.startswith("FACECAST_") and name not in SERVICE_ENV:
            monkeypatch.setenv(name, interpolate_default(value))
    StreamSettings()  # raises on a value the field cannot take


# ---------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_and_apt_list() -> None:
    steps = dockerfile()
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm"), steps[0]
    (base,) = instructions("FROM")
    assert base == "${BASE_IMAGE}"
    runs = instructions("RUN")
    apt = [r for r in runs if "apt-get install" in r]
    assert len(apt) == 1 and "deploy/apt-packages.txt" in apt[0] and "xargs" in apt[0], apt
    assert "curl" in apt[0].split("xargs", 1)[1], "the HEALTHCHECK needs curl"
    copied = [shlex.split(c)[0] for c in instructions("COPY")]
    assert copied[0] == "deploy/apt-packages.txt", "copy the list before installing from it"


def test_dockerfile_gpu_build_args() -> None:
    args = build_args()
    # off by default: a plain `docker build` is the CPU image
    assert args["ONNXRUNTIME"] == "" and args["EXTRA_APT_PACKAGES"] == ""
    assert args["PYTHON"] == "python3"
    steps = dockerfile()
    runs = [(i, a) for i, (inst, a) in enumerate(steps) if inst == "RUN"]
    setup = next(i for i, a in runs if "scripts/setup" in a)
    assert "${PYTHON}" in steps[setup][1]
    gpu = [(i, a) for i, a in runs if "${ONNXRUNTIME}" in a]
    assert len(gpu) == 1, gpu
    index, run = gpu[0]
    check = next(i for i, a in runs if "facecast models --check" in a)
    assert setup < index < check, "replace onnxruntime after setup, before the model check"
    assert run.index("pip uninstall -y onnxruntime") < run.index('pip install "${ONNXRUNTIME}"')
    assert "${EXTRA_APT_PACKAGES}" in next(a for _, a in runs if "apt-get install" in a)
    # the docs' build commands use only arguments the Dockerfile declares
    for text in (DEPLOY_DOC.read_text(), DOCKERFILE.read_text()):
        for name in re.findall(r"--build-arg\s+(\w+)=", text):
            assert name in args, f"--build-arg {name}: no such ARG"


def test_dockerfile_bakes_models_in_at_build() -> None:
    steps = dockerfile()
    runs = [(i, args) for i, (inst, args) in enumerate(steps) if inst == "RUN"]
    setup = [i for i, args in runs if re.search(r"(^|\s|/)scripts/setup\b", args)]
    check = [i for i, args in runs if re.search(r"facecast models --check", args)]
    assert setup and check and setup[0] < check[0], "run scripts/setup, then models --check"
    for _, args in runs:
        assert not re.search(r"\b(curl|wget)\b[^&|;]*https?://", args), f"downloads: {args}"


def test_dockerfile_fetches_nothing_at_run_time() -> None:
    assert exec_form(instructions("ENTRYPOINT")[-1]) == ["facecast"]
    assert exec_form(instructions("CMD")[-1]) == ["serve"]
    at_run = " ".join(instructions("ENTRYPOINT") + instructions("CMD"))
    for word in ("pip", "download", "curl", "wget", "scripts/setup", "http"):
        assert word not in at_run, f"{word!r} at run time: {at_run}"


def test_dockerfile_runtime_user_ports_and_healthcheck() -> None:
    steps = dockerfile()
    users = [args for inst, args in steps if inst == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    last_user = max(i for i, (inst, _) in enumerate(steps) if inst == "USER")
    assert all(inst != "RUN" for inst, _ in steps[last_user:]), "RUN after USER"
    for workload in facecast_workloads():
        assert str(pod_spec(workload)["securityContext"]["runAsUser"]) == user

    assert any(re.search(r"PATH=/app/\.venv/bin:\$PATH", a) for a in instructions("ENV"))
    exposed = {p for args in instructions("EXPOSE") for p in args.split()}
    assert exposed >= {"8080", "1935", "8088"}
    container_ports = {
        str(p["containerPort"])
        for workload in facecast_workloads()
        for c in pod_spec(workload)["containers"]
        for p in c["ports"]
    }
    assert container_ports <= exposed

    (health,) = instructions("HEALTHCHECK")
    url = re.search(r"curl -fsS (http://127\.0\.0\.1:(\d+)(/\S*))", health)
    assert url, health
    assert url.group(3) == "/healthz" and url.group(2) == "8080"


def dockerignore_regexes() -> list[re.Pattern[str]]:
    """.dockerignore patterns as regexes, Docker's way: rooted at the context, ``*`` within one
    path segment, ``**/`` any number of directories."""
    regexes = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip().strip("/")
        if not pattern or pattern.startswith("#"):
            continue
        assert not pattern.startswith("!"), "exceptions are not modelled here"
        parts = re.split(r"(\*\*/|\*|\?)", pattern)
        tokens = {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}
        regexes.append(re.compile("".join(tokens.get(t, re.escape(t)) for t in parts)))
    return regexes


def dockerignored(path: str) -> bool:
    """Whether the path, or a folder it is in, matches a pattern."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(rx.fullmatch(prefix) for rx in dockerignore_regexes() for prefix in prefixes)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "test-artifacts/swap.png",
        "bench/results/swap-latest.json",
        "facecast/__pycache__/cli.cpython-311.pyc",
        "__pycache__/x.pyc",
    ],
)
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert dockerignored(path), f"{path} would be sent to the build"


@pytest.mark.parametrize(
    "path",
    [
        "scripts/setup",
        "deploy/apt-packages.txt",
        "deploy/nginx/nginx.conf.template",
        "pyproject.toml",
        "README.md",
        "facecast/cli/__init__.py",
        "facecast/models/registry.py",
        "examples/obama.jpg",
    ],
)
def test_dockerignore_keeps_what_the_build_needs(path: str) -> None:
    assert (REPO / path).exists(), path
    assert not dockerignored(path), f"{path} is needed by the build but ignored"
