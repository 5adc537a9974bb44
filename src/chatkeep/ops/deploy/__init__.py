"""What to deploy beside chatkeep: a Grafana dashboard and Prometheus alert rules.

Both ship inside the package (``chatkeep/ops/deploy/``) and are printed by
``chatkeep metrics --print-dashboard`` and ``chatkeep metrics --print-alerts``:

* ``grafana-dashboard.json``: a dashboard over the families of
  :mod:`chatkeep.ops.metrics`, with a ``datasource`` variable for your Prometheus;
* ``prometheus-alerts.yml``: alerting rules, each with a ``runbook_url`` annotation into
  the troubleshooting page (``troubleshooting/#<alert>``, relative to where you host the
  docs: :func:`alert_rules` puts your docs' address in front).

Nothing here needs ``prometheus-client``.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

__all__ = ["DASHBOARD", "DEFAULT_PORT", "RULES", "RUNBOOK_PREFIX", "alert_rules", "dashboard"]

DEFAULT_PORT: Final = 9089
"""Where ``chatkeep metrics`` listens by default.

Outside Prometheus's default port allocations (9090-9093 for its own servers, 9100 and up
for exporters, a range now full), as the Prometheus docs ask of an application's own
exporter; the old default, 9187, is postgres_exporter's.
"""

DASHBOARD: Final = "grafana-dashboard.json"
"""The dashboard's file name in this package."""

RULES: Final = "prometheus-alerts.yml"
"""The alert rules' file name in this package."""

RUNBOOK_PREFIX: Final = "troubleshooting/#"
"""How every ``runbook_url`` in the shipped rules begins (a path relative to the docs)."""


def _read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def dashboard() -> str:
    """The Grafana dashboard (JSON text, to import into Grafana)."""
    return _read(DASHBOARD)


def alert_rules(docs_url: str = "") -> str:
    """The Prometheus alert rules (YAML text, for ``rule_files``).

    Args:
        docs_url: where your copy of the chatkeep docs is served (for example
            ``https://docs.example.org/chatkeep/``); put in front of every ``runbook_url``.
            Empty keeps them relative (``troubleshooting/#chatkeepredisdown``).
    """
    text = _read(RULES)
    if not docs_url:
        return text
    base = docs_url if docs_url.endswith("/") else docs_url + "/"
    return text.replace(f"runbook_url: {RUNBOOK_PREFIX}", f"runbook_url: {base}{RUNBOOK_PREFIX}")
