"""Operations: backup and restore, structured logging and metrics.

* :mod:`chatkeep.ops.backup` — ``chatkeep backup`` / ``chatkeep restore``: consistent
  ``pg_dump`` archives of the chatkeep schema, restored all-or-nothing and checked against
  the migration files.
* :mod:`chatkeep.ops.logging` — structured log records, a JSON formatter and a redactor
  that keeps passwords, tokens and message contents out of every log line.
* :mod:`chatkeep.ops.metrics` — Prometheus metric families (optional extra ``metrics``).
"""
