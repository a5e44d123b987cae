"""JWT logins: a token presented as the password, checked locally (PyJWT), no network call per login.

Accepted: HS256 signed with the platform secret (`jwt_secret`), RS256/ES256 signed by a key of the JWKS
(`jwks_file`, `jwks_url`). The token must carry an expiry (`exp`), the org it is for (claim `jwt_org_claim`,
"org" by default) equal to the org of the login, and may carry a backend role (`jwt_role_claim`, "role").
`nbf`, `iat`, and (when configured) `aud`/`iss` are checked too. Every rejection is the same
`TokenRejected` to the client; the reason is only for the server's log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jwt

from o7s_cluster.auth.jwks import ASYMMETRIC, KeySet

MAX_TOKEN = 16 * 1024  # bytes: a JWT is a few hundred; PostgreSQL caps a password message at 64 KiB
LEEWAY = 5.0  # seconds of clock skew allowed on exp/nbf/iat
_ROLE = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}\Z")  # a backend role name we pass on as SET ROLE
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")


class TokenRejected(Exception):
    """A token that does not log in; `reason` is for the server's log, never for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TokenClaims:
    org: str
    subject: str | None
    role: str | None
    expires: float


def looks_like_jwt(password: str) -> bool:
    return len(password) <= MAX_TOKEN and _JWT_SHAPE.match(password) is not None


@dataclass
class JWTPolicy:
    secret: str | None = None
    org_claim: str = "org"
    role_claim: str = "role"
    audience: str | None = None
    issuer: str | None = None

    @classmethod
    def from_settings(cls, s: Any) -> JWTPolicy:
        return cls(s.jwt_secret, s.jwt_org_claim, s.jwt_role_claim, s.jwt_audience, s.jwt_issuer)


class JWTVerifier:
    """Checks a token for one org against the platform secret and the key set; pure CPU, no I/O."""

    def __init__(self, policy: JWTPolicy, keys: KeySet) -> None:
        self.policy = policy
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return self.policy.secret is not None or bool(self.keys.sources)

    def verify(self, token: str, org: str) -> TokenClaims:
        p = self.policy
        if not looks_like_jwt(token):
            raise TokenRejected("not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("malformed JWT header") from None
        alg = header.get("alg")
        if alg == "HS256" and p.secret is not None:
            key: Any = p.secret
        elif alg in ASYMMETRIC and self.keys.sources:
            kid = header.get("kid")
            jwk = self.keys.get(kid if isinstance(kid, str) else None)
            if jwk is None:
                raise TokenRejected(f"no key {kid!r} in the JWKS")
            if jwk.algorithm_name != alg:
                raise TokenRejected(f"key {kid!r} is not an {alg} key")
            key = jwk.key
        else:
            raise TokenRejected(f"algorithm {alg!r} is not accepted")
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=p.audience, issuer=p.issuer, leeway=LEEWAY,
                options={"require": ["exp"], "verify_aud": p.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("expired") from None
        except jwt.PyJWTError as e:
            raise TokenRejected(f"{type(e).__name__}") from None
        claim_org = claims.get(p.org_claim)
        if claim_org != org:
            raise TokenRejected("for another org" if isinstance(claim_org, str) else f"no {p.org_claim!r} claim")
        role = claims.get(p.role_claim)
        if role is not None and (not isinstance(role, str) or not _ROLE.match(role)):
            raise TokenRejected(f"invalid {p.role_claim!r} claim")
        sub = claims.get("sub")
        return TokenClaims(org, sub if isinstance(sub, str) else None, role, float(claims["exp"]))
