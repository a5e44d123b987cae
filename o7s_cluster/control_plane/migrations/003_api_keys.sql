-- API keys (issue 13, step 3): an org's keys, stored as the SHA-256 of the secret part only. The prefix is
-- the key's public, unique handle (shown by `o7s org apikey list`, used to find the row at login).
CREATE TABLE platform.api_keys (
  id            UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  org_id        UUID NOT NULL REFERENCES platform.organizations(id) ON DELETE CASCADE,
  name          TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 63),
  prefix        TEXT NOT NULL UNIQUE,
  key_hash      BYTEA NOT NULL CHECK (length(key_hash) = 32),
  created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
  expires_at    TIMESTAMPTZ,
  last_used_at  TIMESTAMPTZ,
  revoked_at    TIMESTAMPTZ,
  UNIQUE (org_id, name)
);
