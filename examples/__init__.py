"""Example applications built on chatkeep (run from the repository root)."""
