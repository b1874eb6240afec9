"""/metrics beyond the streams (process_*, build info), the Grafana dashboard and the alert rules.

The dashboard and the rules are checked against what facecast really exposes: a real stream
runs, /metrics is read over HTTP from a real server, and every metric name that a PromQL
expression names must be in that exposition. promtool (Debian's prometheus package, installed
by scripts/setup) checks the exposition, parses every expression and runs the rules' unit tests.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from facecast.config import ModelSettings, StreamSettings
from facecast.serve.app import ThreadedServer, create_app
from facecast.serve.ingest import IngestServer, free_port, free_ports
from facecast.serve.metrics import IngestCollector
from facecast.serve.streams import StreamManager
from tests.live_helpers import wait_until

from .conftest import MEDIA, REPO

CLIP = MEDIA / "short_hamilton_clip.mp4"
FACE = REPO / "examples" / "obama.jpg"
TOKEN = "s3cret-token"
DASHBOARD = REPO / "deploy" / "grafana" / "facecast-dashboard.json"
RULES = REPO / "deploy" / "prometheus" / "facecast-rules.yaml"
RULES_TEST = REPO / "deploy" / "prometheus" / "facecast-rules.test.yaml"
# Labels Prometheus adds to every scraped series (target labels), not facecast's own.
TARGET_LABELS = {"job", "instance"}


# ---------------------------------------------------------------------------------- helpers


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        # scripts/test runs scripts/setup, which installs it: missing means a broken setup,
        # so fail rather than skip (as tests/test_server.py does)
        pytest.fail("promtool missing: scripts/setup installs Debian's prometheus package")
    return path


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO
    )


class Exposition:
    """One /metrics response, parsed."""

    def __init__(self, text: str, content_type: str) -> None:
        self.text = text
        self.content_type = content_type
        self.families = list(text_string_to_metric_families(text))
        self.samples: list[Sample] = [s for f in self.families for s in f.samples]

    def names(self) -> set[str]:
        """Every series name a query could use: the samples' names, plus the names a family
        with no sample yet would have (so an idle family still counts as exposed)."""
        names = {s.name for s in self.samples}
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        for family in self.families:
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
        return names

    def label_names(self, name: str) -> set[str]:
        return {label for s in self.samples if s.name == name for label in s.labels}

    def only(self, name: str) -> Sample:
        found = [s for s in self.samples if s.name == name]
        assert len(found) == 1, f"{name}: {len(found)} samples"
        return found[0]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exposition]:
    """/metrics of a real server while a real stream runs, so every facecast family has
    samples (the histograms' _bucket series included), read once for the whole module."""
    manager = StreamManager()
    # serve's ingest server metrics too (an IngestServer never started: facecast_ingest_up 0)
    ingest = IngestServer(*free_ports(2), prefix=tmp_path_factory.mktemp("ingest"))
    manager.collectors.append(IngestCollector(ingest))
    out = tmp_path_factory.mktemp("observability") / "cam.ts"
    # realtime: paced at the clip's 30 fps, so the stream is still running when scraped
    settings = StreamSettings(source_image=FACE, input=str(CLIP), output=str(out), realtime=True)
    server = ThreadedServer(create_app(manager, TOKEN), "127.0.0.1", free_port())
    try:
        handle = manager.start("cam", settings)
        stats = handle.pipeline.stats
        assert wait_until(
            lambda: (
                stats.latency_histogram.count >= 5
                and {"process", "output"} <= set(stats.clock.histograms)
            ),
            90,
        ), "the stream produced no output"
        server.start()
        # no Authorization header: /metrics is open by design, even with a token configured
        with urllib.request.urlopen(f"http://{server.where}/metrics", timeout=10) as response:
            assert response.status == 200
            yield Exposition(response.read().decode(), response.headers["Content-Type"])
    finally:
        server.stop()
        manager.stop_all()


_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)"
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects. Not a full parser (promtool parses the
    same expressions elsewhere in this file); enough for the queries written here: strings,
    label matchers, ranges and grouping label lists are cut out first, then every identifier
    left that is not a function call or a keyword is a metric name."""
    expr = re.sub(_STRING, '""', expr)  # first: strings may hold braces or brackets
    expr = re.sub(r"\{[^{}]*\}", " ", expr)
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)
    expr = re.sub(_GROUPING, " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w$.:])[A-Za-z_:][\w:]*", expr):
        name = match.group()
        if expr[match.end() :].lstrip().startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def grafana_to_promql(expr: str) -> str:
    """A dashboard query as Prometheus would receive it: Grafana's interval variables become a
    range, the template variables (used only inside =~ matchers) match everything."""
    expr = re.sub(r"\$\{?__\w+\}?", "5m", expr)
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def rule_tests() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES_TEST.read_text())["tests"]


# ---------------------------------------------------------------------------------- /metrics


def test_metrics_carry_process_and_build_info_and_pass_promtool(live: Exposition) -> None:
    assert live.content_type.startswith("text/plain; version=0.0.4")
    for name in ("process_cpu_seconds_total", "process_start_time_seconds", "process_open_fds"):
        assert live.only(name).value > 0, name
    assert live.only("process_resident_memory_bytes").value > 50 * 1024 * 1024  # models loaded

    info = live.only("facecast_build_info")
    assert info.value == 1
    assert info.labels == {
        "version": metadata.version("facecast"),
        "python": platform.python_version(),
        "default_swapper": ModelSettings.model_fields["swapper"].default,
    }

    # the stream's own families are all there, with samples: the dashboard and rules tests
    # below compare against real series, not just declared families
    sampled = {s.name for s in live.samples}
    for name in (
        "facecast_frames_total",
        "facecast_faces",
        "facecast_reconnects_total",
        "facecast_stream_up",
        "facecast_latency_seconds_bucket",
        "facecast_stage_seconds_bucket",
        "facecast_streams_active",
    ):
        assert name in sampled, name
    assert live.only("facecast_streams_active").value == 1

    checked = run_promtool("check", "metrics", stdin=live.text)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_each_app_has_its_own_registry() -> None:
    # Two apps in one process (as in the tests, or serve beside web) must not share a
    # registry: ProcessCollector on the global one would fail to register twice.
    texts = []
    for _ in range(2):
        manager = StreamManager()
        texts.append(TestClient(create_app(manager, None)).get("/metrics").text)
    for text in texts:
        assert text.count("# TYPE process_cpu_seconds_total counter") == 1
        assert text.count("# TYPE facecast_build_info gauge") == 1
    assert "facecast_build_info" not in prometheus_client.generate_latest().decode()


# ---------------------------------------------------------------------------------- dashboard


def test_metric_names_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (stream, le) (rate(a_bucket{x=~"$v", y="{b}"}'
        "[$__rate_interval]))) / on (stream) group_left c_total offset 5m > bool 1e3"
    )
    assert metric_names(expr) == {"a_bucket", "c_total"}
    assert metric_names("sum without (result) (rate(d[5m])) and max_over_time(e[15m]) == 1") == {
        "d",
        "e",
    }


def test_dashboard_is_importable_and_every_panel_has_a_title() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    # a datasource variable, so the JSON imports into any Grafana whatever its Prometheus
    # data source is called (the UI import and file provisioning alike)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(board):
        assert panel.get("title", "").strip(), f"panel {panel['id']} has no title"
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}", variable["name"]


def test_dashboard_queries_name_only_exposed_metrics(live: Exposition) -> None:
    exposed = live.names()
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exposed, f"{sorted(names - exposed)} not in /metrics: {expr}"
        used |= names
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable_query(variable).strip())
        assert match, f"variable {variable['name']}: expected label_values(SELECTOR, LABEL)"
        names = metric_names(match.group(1))
        assert names and names <= exposed, variable["name"]
        label = match.group(2)
        assert label in TARGET_LABELS | {lb for n in names for lb in live.label_names(n)}, label
    # what the dashboard is for: each of these must have a panel
    for name in (
        "facecast_frames_total",
        "facecast_latency_seconds_bucket",
        "facecast_stage_seconds_bucket",
        "facecast_reconnects_total",
        "facecast_stream_up",
        "facecast_streams_active",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert name in used, f"no panel shows {name}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool has no "check expression"; a recording rule per query gets each one parsed
    # by Prometheus's own parser
    records = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ---------------------------------------------------------------------------------- alert rules


def test_alert_rules_pass_promtool_check() -> None:
    checked = run_promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alert_rules_unit_tests_pass() -> None:
    tested = run_promtool("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_alert_rules_are_labelled_annotated_and_use_exposed_metrics(live: Exposition) -> None:
    exposed = live.names()
    alerts = {}
    for rule in rules():
        assert "alert" in rule, f"only alerts here: {rule}"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        names = metric_names(rule["expr"])
        assert names and names <= exposed, f"{rule['alert']}: {sorted(names - exposed)}"
        alerts[rule["alert"]] = names
    # the four conditions the rules are for, by the metric each watches
    watched = {
        "facecast_stream_up",
        "facecast_frames_total",
        "facecast_latency_seconds_bucket",
        "facecast_reconnects_total",
    }
    assert watched <= set().union(*alerts.values())
    assert len(alerts) >= 4


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in rule_tests():
        for case in test["alert_rule_test"]:
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in rules()}
    assert alerts <= firing, f"never shown firing: {sorted(alerts - firing)}"
    assert alerts <= quiet, f"never shown quiet: {sorted(alerts - quiet)}"


def test_rule_tests_feed_series_shaped_like_the_real_ones(live: Exposition) -> None:
    # The unit tests prove the rules against the input series they are given; those must
    # have the names and labels facecast really exposes, or the proof is about nothing.
    exposed = live.names()
    for test in rule_tests():
        for series in test["input_series"]:
            match = re.fullmatch(r"(\w+)\{(.*)\}", series["series"].strip())
            assert match, series["series"]
            name, labels = match.group(1), set(re.findall(r'(\w+)="', match.group(2)))
            assert name in exposed, name
            real = live.label_names(name) | TARGET_LABELS
            assert labels <= real, f"{name}: labels {sorted(labels - real)} not in /metrics"


def test_deploy_doc_points_at_the_rules_and_the_dashboard() -> None:
    doc = (REPO / "docs" / "deploy.md").read_text()
    for path in (DASHBOARD, RULES, RULES_TEST):
        assert str(path.relative_to(REPO)) in doc, path.name
