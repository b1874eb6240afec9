"""The container and cluster files: what can be checked without Docker or a cluster.

The YAML parses; the probes point at the HTTP plane's routes by port names that exist; names
and labels line up across the manifests; every environment name is one facecast reads; the
image installs what scripts/setup installs, checks the models at build time and fetches
nothing at run time.
"""

from __future__ import annotations

import json
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from facecast.config import StreamSettings
from facecast.server import METRICS_KEYS_ENV

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
LABEL = {"app.kubernetes.io/name": "facecast"}
# FACECAST_* names read outside StreamSettings: the HTTP plane's token, the profiles file and
# how /metrics labels streams (server.METRICS_KEYS_ENV).
SERVICE_ENV = {"FACECAST_API_TOKEN", "FACECAST_PROFILES", METRICS_KEYS_ENV}
SEED_ENV = {"SOURCE_IMAGE": "source_image", "TARGET_STREAM": "input", "OUTPUT_STREAM": "output"}


# ---------------------------------------------------------------------------------- helpers


def k8s_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def k8s_docs() -> list[dict]:
    docs = []
    for path in k8s_files():
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def only(kind: str, name: str | None = None) -> dict:
    found = [d for d in k8s_docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def deployment() -> dict:
    return only("Deployment")


def containers() -> list[dict]:
    return deployment()["spec"]["template"]["spec"]["containers"]


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_env(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", "NAME"]
        return dict([*item.split("=", 1), None][:2] for item in env)
    return env


def interpolate_default(value: str) -> str:
    """``${NAME:-default}`` → ``default``, as compose does with NAME unset."""
    match = re.fullmatch(r"\$\{(\w+):?-([^}]*)\}", value)
    assert match, f"{value!r}: expected ${{NAME:-default}}"
    return match.group(2)


def env_names_everywhere() -> set[str]:
    names = set()
    for doc in k8s_docs():
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                names |= {e["name"] for e in c.get("env", [])}
    for service in compose()["services"].values():
        names |= set(compose_env(service))
    names |= set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    # and any FACECAST_* name mentioned anywhere, comments and the doc included
    for path in [*k8s_files(), COMPOSE, DOCKERFILE, REPO / "docs" / "deploy.md"]:
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


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args!r}: use the JSON (exec) form"
    return value


# ---------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("path", [*k8s_files(), COMPOSE], ids=lambda p: p.name)
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    if path.parent == K8S:
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["metadata"].get("labels", {}).items() >= LABEL.items(), (
                f"{path}: {doc['kind']} lacks the label {LABEL}"
            )


def test_expected_kinds_present() -> None:
    kinds = {d["kind"] for d in k8s_docs()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds


# ---------------------------------------------------------------------------------- Kubernetes


def test_probes_point_at_health_routes_by_existing_port_names() -> None:
    for container in containers():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("http") == 8080 and ports.get("rtmp") == 1935, ports
        live = container["livenessProbe"]["httpGet"]
        ready = container["readinessProbe"]["httpGet"]
        assert live["path"] == "/healthz"
        assert ready["path"] == "/readyz"
        startup = container.get("startupProbe", {}).get("httpGet")
        for probe in (live, ready, *([startup] if startup else [])):
            assert probe["port"] in ports, f"probe port {probe['port']!r} not in {list(ports)}"


def test_deployment_runs_serve_with_requested_resources() -> None:
    (container,) = containers()
    assert container["args"] == ["serve"]
    assert "command" not in container, "keep the image's ENTRYPOINT (facecast)"
    requests = container["resources"]["requests"]
    assert str(requests["cpu"]) == "2" and requests["memory"] == "2Gi"


def test_deployment_env_token_from_secret_and_profiles_from_configmap() -> None:
    (container,) = containers()
    env = {e["name"]: e for e in container["env"]}
    ref = env["FACECAST_API_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = only("Secret", ref["name"])
    assert ref["key"] in secret.get("stringData", secret.get("data", {}))

    profiles_path = Path(env["FACECAST_PROFILES"]["value"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
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
    hpa = only("HorizontalPodAutoscaler")
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
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels.items() >= LABEL.items()
    port_names = {p["name"] for c in containers() for p in c["ports"]}
    services = [d for d in k8s_docs() if d["kind"] == "Service"]
    assert any(s["metadata"]["name"] == "facecast" for s in services)
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items(), service["metadata"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert {"http", "rtmp"} <= ports.keys()
        assert ports["http"]["port"] == 8080 and ports["rtmp"]["port"] == 1935
        for port in ports.values():
            assert port["targetPort"] in port_names


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
    assert {"1935", "8080"} <= published
    assert "FACECAST_API_TOKEN" in compose_env(serve)


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
    fields = {f"FACECAST_{name.upper()}" for name in StreamSettings.model_fields}
    for name in env_names_everywhere():
        if name.startswith("FACECAST_"):
            assert name in SERVICE_ENV | fields, f"{name}: facecast reads no such variable"
        else:
            assert name in SEED_ENV, f"{name}: not a name facecast reads"


def test_compose_facecast_env_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = compose_env(compose()["services"]["facecast"])
    for name, value in env.items():
        if name.startswith("FACECAST_") and name not in SERVICE_ENV:
            monkeypatch.setenv(name, interpolate_default(value))
    StreamSettings()  # raises on a value the field cannot take


# ---------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_and_apt_list() -> None:
    (base,) = instructions("FROM")
    assert base == "python:3.11-slim-bookworm"
    runs = instructions("RUN")
    apt = [r for r in runs if "apt-get install" in r]
    assert len(apt) == 1 and "deploy/apt-packages.txt" in apt[0] and "xargs" in apt[0], apt
    assert "curl" in apt[0].split("xargs", 1)[1], "the HEALTHCHECK needs curl"
    copied = [shlex.split(c)[0] for c in instructions("COPY")]
    assert copied[0] == "deploy/apt-packages.txt", "copy the list before installing from it"


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
    pod = deployment()["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == user

    assert any(re.search(r"PATH=/app/\.venv/bin:\$PATH", a) for a in instructions("ENV"))
    exposed = {p for args in instructions("EXPOSE") for p in args.split()}
    assert exposed >= {"8080", "1935"}
    container_ports = {str(p["containerPort"]) for c in containers() for p in c["ports"]}
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
        "facecast/cli.py",
        "facecast/models.py",
        "examples/obama.jpg",
    ],
)
def test_dockerignore_keeps_what_the_build_needs(path: str) -> None:
    assert (REPO / path).exists(), path
    assert not dockerignored(path), f"{path} is needed by the build but ignored"
