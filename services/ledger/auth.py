"""Bearer tokens of the ledger API. Roles: `auditor` reads everything, `partner` reads what
concerns its own party, `ops` reads the log and health. Tokens live in a JSON file
(`API_TOKENS`), written for development by `gputrace keys init`.

The file holds only each token's SHA-256 (`token_sha256`): whoever reads it (a backup, a
misconfigured volume) cannot use it. The plain token is shown once, when it is issued; for
development, `gputrace keys init` also keeps them in `tokens.dev.json` beside it (docs/ops.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPBearer

from shared.contract.parties import PartyRegistry

Role = Literal["auditor", "partner", "ops"]
ROLES: tuple[Role, ...] = get_args(Role)


class TokenFileError(ValueError):
    """The tokens file cannot be trusted as it is: the ledger refuses to start."""


@dataclass(frozen=True)
class Principal:
    role: Role
    party_id: str | None = None
    name: str = ""

    def can_read_party(self, party_id: str | None) -> bool:
        return self.role == "auditor" or (self.role == "partner" and party_id == self.party_id)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Tokens:
    """The issued tokens, by digest. `find` compares every stored digest in constant time, so
    neither the answer's timing nor a hash-table probe tells how close a guess was."""

    entries: tuple[tuple[bytes, Principal], ...] = ()

    def find(self, token: str) -> Principal | None:
        digest = token_digest(token)
        found: Principal | None = None
        for stored, principal in self.entries:
            # No early exit: every entry is compared whatever matched.
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    def __len__(self) -> int:
        return len(self.entries)


def load_tokens(path: Path, registry: PartyRegistry | None = None) -> Tokens:
    """Every entry checked: a known role, a SHA-256 digest, and for a partner a party_id that is
    in the registry (when the ledger has one). Anything else raises TokenFileError."""
    if not path.exists():
        return Tokens()
    try:
        doc = json.loads(path.read_text())
        items = doc["tokens"]
        if not isinstance(items, list):
            raise TypeError("tokens is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenFileError(f"{path}: not a tokens file ({exc})") from exc
    entries: list[tuple[bytes, Principal]] = []
    for n, t in enumerate(items):
        where = f"{path}: token #{n} ({t.get('name', '?') if isinstance(t, dict) else '?'})"
        if not isinstance(t, dict):
            raise TokenFileError(f"{where}: not an object")
        if "token" in t:
            raise TokenFileError(f"{where}: holds a plain token; store only token_sha256 (run `gputrace keys init`)")
        role = t.get("role")
        if role not in ROLES:
            raise TokenFileError(f"{where}: unknown role {role!r} (one of {', '.join(ROLES)})")
        try:
            digest = bytes.fromhex(t["token_sha256"])
        except (KeyError, TypeError, ValueError):
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise TokenFileError(f"{where}: token_sha256 is not a SHA-256 in hex")
        party = t.get("party_id")
        if role == "partner":
            # Without a party a partner token would be filtered by nothing (it read every batch).
            if not isinstance(party, str) or not party:
                raise TokenFileError(f"{where}: a partner token needs a party_id")
            if registry is not None and registry.get(party) is None:
                raise TokenFileError(f"{where}: party {party!r} is not in the party registry")
        elif party is not None:
            raise TokenFileError(f"{where}: only a partner token carries a party_id")
        entries.append((digest, Principal(role=role, party_id=party, name=str(t.get("name", role)))))
    return Tokens(tuple(entries))


def dev_tokens_path(path: Path) -> Path:
    """Development only: the plain tokens, beside the hashed file (never read by the ledger)."""
    return path.with_name(path.stem + ".dev" + path.suffix)


def write_dev_tokens(path: Path, partner_ids: list[str]) -> dict[str, str]:
    """Issues the development tokens: the hashed file for the ledger, and the plain ones returned
    and kept in the dev file. Tokens already issued are kept, so re-running logs no one out."""
    plain_path = dev_tokens_path(path)
    existing = json.loads(plain_path.read_text()) if plain_path.exists() and path.exists() else {}
    if not existing and path.exists():
        # A file from before tokens were hashed: keep its tokens, now stored hashed.
        old = json.loads(path.read_text()).get("tokens", [])
        existing = {t["name"]: t["token"] for t in old if isinstance(t, dict) and "token" in t and "name" in t}
    wanted = [("auditor", "auditor", None), ("ops", "ops", None)] + [
        (f"partner:{p}", "partner", p) for p in partner_ids
    ]
    plain: dict[str, str] = {}
    hashed = []
    for name, role, party in wanted:
        # The prefix: a token never starts with "-", which a command line would take for an option.
        token = existing.get(name) or "gt_" + secrets.token_urlsafe(24)
        plain[name] = token
        hashed.append({"name": name, "role": role, "party_id": party, "token_sha256": token_digest(token).hex()})
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, doc in ((path, {"tokens": hashed}), (plain_path, plain)):
        target.write_text(json.dumps(doc, indent=2) + "\n")
        target.chmod(0o600)
    return plain


class BearerPrincipal(HTTPBearer):
    """The request's principal, from its bearer token, for a route open to `roles`: the security
    scheme FastAPI documents, the token lookup and the role check in ONE dependency. As a chain of
    three (scheme, lookup, check) it cost FastAPI two more dependency resolutions per request."""

    def __init__(self, roles: tuple[Role, ...] = ROLES) -> None:
        # The scheme's name as before, so the OpenAPI document is unchanged.
        super().__init__(auto_error=False, description="A token from the API_TOKENS file", scheme_name="HTTPBearer")
        self.roles = roles

    # async: a token lookup is a hash and a comparison per token, never blocking; a plain def would
    # be sent to FastAPI's thread pool on every request.
    async def __call__(self, request: Request) -> Principal:  # type: ignore[override]
        creds = await super().__call__(request)
        if creds is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        principal: Principal | None = request.app.state.tokens.find(creds.credentials)
        if principal is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        if principal.role not in self.roles:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"role {principal.role} may not read this")
        return principal


CurrentPrincipal = Annotated[Principal, Depends(BearerPrincipal())]


def require(*roles: Role) -> Any:
    """A dependency admitting only these roles (401 without a known token, 403 for another role)."""
    return Depends(BearerPrincipal(roles))
