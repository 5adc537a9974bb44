"""The shipped Grafana dashboard and Prometheus alert rules, checked with promtool.

``promtool`` comes with Prometheus (Debian: ``apt-get install prometheus``; CI installs it).
Without it these tests skip on a workstation; under ``CI`` they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from markdown.extensions.toc import slugify
from typer.testing import CliRunner

from chatkeep.cli import app
from chatkeep.ops import deploy
from chatkeep.ops.metrics import FAMILIES, ChatkeepMetrics
from chatkeep.realtime import RedisClient
from chatkeep.storage import Database
from tests.ops.cli import invoke

ROOT = Path(__file__).resolve().parents[2]
RULE_TESTS = Path(__file__).with_name("alerts_test.yml")

# PromQL words that are not metric names: functions, aggregations, keywords, Grafana's macros.
_PROMQL_WORDS = frozenset(
    {
        "sum", "min", "max", "avg", "count", "by", "without", "rate", "increase",
        "histogram_quantile", "label_values", "and", "or", "unless", "on", "ignoring",
        "group_left", "group_right", "bool", "offset", "absent",
    }
)  # fmt: skip


@pytest.fixture
def promtool() -> str:
    """The promtool binary; skipped without one, except under CI where that is a failure."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (apt-get install prometheus): CI needs it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run_promtool(promtool: str, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def exported_names() -> set[str]:
    """Every series name chatkeep can expose: the families and their histogram suffixes."""
    names = set(FAMILIES)
    for family in FAMILIES:
        names |= {f"{family}_bucket", f"{family}_count", f"{family}_sum"}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers and strings removed)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings ("$instance", "+Inf")
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges ([5m], [$__rate_interval])
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", bare)  # grouping labels
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return {w for w in words if w not in _PROMQL_WORDS}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(deploy.alert_rules())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def test_the_rules_pass_promtool_check_and_their_unit_tests(promtool: str) -> None:
    shipped = ROOT / "src/chatkeep/ops/deploy" / deploy.RULES
    assert "SUCCESS: 9 rules found" in run_promtool(promtool, "check", "rules", str(shipped))
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", str(RULE_TESTS))


def test_every_alert_is_unit_tested_and_reads_only_chatkeep_metrics() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    for rule in rules():
        assert rule["alert"] in tested, f"{rule['alert']} never fires in {RULE_TESTS.name}"
        assert metric_names(rule["expr"]) <= exported_names(), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}


def test_every_runbook_url_leads_to_a_troubleshooting_section() -> None:
    text = (ROOT / "docs/troubleshooting.md").read_text(encoding="utf-8")
    anchors = {
        slugify(heading, "-") for heading in re.findall(r"^#{2,4} (.+)$", text, re.MULTILINE)
    }
    for rule in rules():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith(deploy.RUNBOOK_PREFIX), url
        assert url.removeprefix(deploy.RUNBOOK_PREFIX) in anchors, url


def test_the_dashboard_reads_only_metrics_chatkeep_exports() -> None:
    dashboard = json.loads(deploy.dashboard())
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            used |= metric_names(target["expr"])
    unknown = used - exported_names()
    assert not unknown, f"the dashboard queries metrics chatkeep does not export: {unknown}"
    # Every family is on some panel (a new family needs a panel, or a reason not to).
    assert {name for name in FAMILIES if not any(u.startswith(name) for u in used)} == set()
    assert metric_names('sum by (le) (rate(x_bucket{a="b"}[5m])) / y') == {"x_bucket", "y"}


async def test_an_exposition_passes_promtool_check_metrics(
    promtool: str,
    make_settings: Callable[..., Any],
    database_url: str,
    redis_url: str,
) -> None:
    async with (
        Database(make_settings(), dsn=database_url) as db,
        RedisClient(redis_url, retries=0) as redis,
    ):
        metrics = ChatkeepMetrics(database=db, redis=redis, connection_failures=list)
        await db.fetchval("deploy.probe", "SELECT 1")
        with metrics.time_operation("send_message"):
            pass
        metrics.gap("overflow")
        await metrics.sample()
        text = metrics.exposition().decode()
    assert "chatkeep_db_up 1.0" in text
    # promtool prints lint problems and exits 1; a clean exposition prints nothing.
    assert run_promtool(promtool, "check", "metrics", stdin=text) == ""


async def test_the_cli_prints_the_dashboard_and_the_alerts(
    cli_env: Callable[..., dict[str, str]],
) -> None:
    env = cli_env()
    code, output, _ = await invoke(
        ["metrics", "--print-alerts", "--docs-url", "https://docs.example.org/chatkeep"], env
    )
    assert code == 0
    assert "runbook_url: https://docs.example.org/chatkeep/troubleshooting/#chatkeepredisdown" in (
        output
    )
    assert deploy.alert_rules("https://x/") == deploy.alert_rules("https://x").replace("x//", "x/")
    code, output, _ = await invoke(["metrics", "--print-dashboard", "--print-alerts"], env)
    assert code == 1
    assert "choose one" in output


def test_the_dashboard_printed_is_the_file_shipped() -> None:
    result = CliRunner().invoke(app, ["metrics", "--print-dashboard"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["uid"] == "chatkeep"
    shipped = ROOT / "src/chatkeep/ops/deploy" / deploy.DASHBOARD
    assert result.stdout == shipped.read_text(encoding="utf-8")
