"""Bearer tokens of the ledger API. Roles: `auditor` reads everything, `partner` reads what
concerns its own party, `ops` reads the log and health. Tokens live in a JSON file
(`API_TOKENS`), written for development by `gputrace keys init`."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

Role = Literal["auditor", "partner", "ops"]


@dataclass(frozen=True)
class Principal:
    role: Role
    party_id: str | None = None
    name: str = ""

    def can_read_party(self, party_id: str | None) -> bool:
        return self.role == "auditor" or (self.role == "partner" and party_id == self.party_id)


def load_tokens(path: Path) -> dict[str, Principal]:
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    return {
        t["token"]: Principal(role=t["role"], party_id=t.get("party_id"), name=t.get("name", t["role"]))
        for t in doc["tokens"]
    }


def write_dev_tokens(path: Path, partner_ids: list[str]) -> dict[str, str]:
    """Keeps tokens already issued, so re-running does not log anyone out."""
    existing = json.loads(path.read_text())["tokens"] if path.exists() else []
    by_name = {t["name"]: t for t in existing}
    wanted = [("auditor", "auditor", None), ("ops", "ops", None)] + [
        (f"partner:{p}", "partner", p) for p in partner_ids
    ]
    tokens = []
    for name, role, party in wanted:
        # The prefix: a token never starts with "-", which a command line would take for an option.
        token = "gt_" + secrets.token_urlsafe(24)
        t = by_name.get(name) or {"name": name, "role": role, "party_id": party, "token": token}
        tokens.append(t)
    path.write_text(json.dumps({"tokens": tokens}, indent=2) + "\n")
    path.chmod(0o600)
    return {t["name"]: t["token"] for t in tokens}


_bearer = HTTPBearer(auto_error=False, description="A token from the API_TOKENS file")


def current_principal(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if creds is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    principal = request.app.state.tokens.get(creds.credentials)
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"})
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(*roles: Role):  # type: ignore[no-untyped-def]
    def check(principal: CurrentPrincipal) -> Principal:
        if principal.role not in roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {principal.role} may not read this")
        return principal

    return Depends(check)
