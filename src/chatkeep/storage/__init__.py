"""PostgreSQL: connections, migrations and one repository per entity."""
