"""Operations: backup and restore, structured logging, metrics, traces, dashboard, alerts.

* :mod:`chatkeep.ops.backup` — ``chatkeep backup``: consistent ``pg_dump`` archives of the
  chatkeep schema.
* :mod:`chatkeep.ops.restore` — ``chatkeep restore``: those archives restored
  all-or-nothing and checked against the migration files.
* :mod:`chatkeep.ops.pgtools` — finding ``pg_dump``/``pg_restore``/``psql`` of the right
  version, running them (never outliving a cancelled caller) and reading their progress.
* :mod:`chatkeep.ops.logging` — structured log records, a JSON formatter and a redactor
  that keeps passwords, tokens and message contents out of every log line.
* :mod:`chatkeep.ops.metrics` — Prometheus metric families (optional extra ``metrics``).
* :mod:`chatkeep.ops.tracing` — OpenTelemetry spans of flows, named database operations
  and Redis operations (optional extra ``otel``; nothing is made without a tracer provider).
* :mod:`chatkeep.ops.deploy` — the Grafana dashboard and Prometheus alert rules shipped
  beside them.
"""
