"""The witness service's schema history (Alembic revisions; shared.runtime.migrations runs them)."""
