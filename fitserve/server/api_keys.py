"""`--api-keys-file`: the API keys a server accepts, the tenant each belongs to, and the
tenants' share weights for the `vtc` scheduling policy.

One key per line: `KEY TENANT [WEIGHT]`, separated by whitespace; blank lines and lines
starting with `#` are skipped. Several keys may name the same tenant (they then share one
fair-share counter); a tenant's weight, if given on more than one line, must agree.

    # key                 tenant     weight
    sk-team-a-1           team-a     2
    sk-team-a-2           team-a
    sk-team-b             team-b
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

from fitserve.config import ConfigError


@dataclass
class APIKeys:
    tenants: dict[str, str] = field(default_factory=dict)
    """key -> tenant."""
    weights: dict[str, float] = field(default_factory=dict)
    """tenant -> weight, for tenants whose weight was given."""

    def tenant_of(self, presented: str) -> str | None:
        """The tenant of a presented key, or None. Every key is compared in constant time, so
        response timing says nothing about how much of a key matched."""
        found = None
        encoded = presented.encode()
        for key, tenant in self.tenants.items():
            if hmac.compare_digest(encoded, key.encode()):
                found = tenant
        return found


def load_api_keys_file(path: str | Path) -> APIKeys:
    """Read a keys file; a malformed line is a ConfigError naming the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read --api-keys-file {path}: {error.strerror or error}") from error
    keys = APIKeys()
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{path}, line {number}"
        if len(words) not in (2, 3):
            raise ConfigError(f"{where}: expected 'KEY TENANT [WEIGHT]', got {len(words)} fields")
        key, tenant = words[0], words[1]
        if key in keys.tenants:
            raise ConfigError(f"{where}: the key is listed twice")
        keys.tenants[key] = tenant
        if len(words) == 3:
            try:
                weight = float(words[2])
            except ValueError:
                weight = float("nan")
            if not 0 < weight < float("inf"):
                raise ConfigError(f"{where}: the weight must be a positive number (got {words[2]!r})")
            if keys.weights.get(tenant, weight) != weight:
                raise ConfigError(f"{where}: tenant {tenant!r} was given weight {keys.weights[tenant]} before")
            keys.weights[tenant] = weight
    if not keys.tenants:
        raise ConfigError(f"--api-keys-file {path} lists no keys")
    return keys
