"""The dashboard for people (docs/architecture.md §6), served by the ledger at `/`."""

from services.ledger.dashboard.router import router

__all__ = ["router"]
