"""The export_controls service's schema history (Alembic revisions; shared.runtime.migrations runs them)."""
