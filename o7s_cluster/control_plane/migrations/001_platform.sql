-- O7s control plane, first schema. Applied once by `o7s migrate`; later changes are new files.
CREATE SCHEMA IF NOT EXISTS platform;

CREATE TABLE platform.tier_limits (
  tier                      TEXT PRIMARY KEY,
  rank                      INT  NOT NULL UNIQUE,          -- upgrade order: free < starter < pro < enterprise
  max_connections           INT  NOT NULL CHECK (max_connections > 0),
  max_qps                   INT  NOT NULL CHECK (max_qps > 0),
  max_storage_gb            INT  NOT NULL,
  pool_size                 INT  NOT NULL CHECK (pool_size > 0),  -- backend connections per (org, database)
  max_query_wait_ms         INT  NOT NULL,                -- longest a throttled query may wait for a token
  statement_timeout_ms      INT  NOT NULL,
  work_mem                  TEXT NOT NULL,
  can_burst                 BOOLEAN NOT NULL,
  base_fee_usd              NUMERIC(10,2) NOT NULL,
  included_vcpu_hours       NUMERIC(10,2) NOT NULL,
  included_memory_gb_hours  NUMERIC(10,2) NOT NULL,
  overage_vcpu_usd          NUMERIC(10,4) NOT NULL,
  overage_memory_gb_usd     NUMERIC(10,4) NOT NULL
);

-- The seed's four tiers (seed 001, section 4.3).
INSERT INTO platform.tier_limits VALUES
  ('free',       0,   5,   10,    1,  3,  1000,   5000, '4MB',  false,   0,    5,   10, 0,    0),
  ('starter',    1,  10,   50,   10,  5,  1000,  15000, '8MB',  true,   10,   25,   50, 0.15, 0.05),
  ('pro',        2,  50,  200,  100, 20,  2000,  60000, '32MB', true,   50,  200,  500, 0.12, 0.04),
  ('enterprise', 3, 200, 1000, 1000, 50,  5000, 300000, '64MB', true,  200, 1000, 2000, 0.10, 0.03);

CREATE TABLE platform.organizations (
  id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  name       TEXT NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
  tier       TEXT NOT NULL REFERENCES platform.tier_limits(tier),
  created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Login secrets: SCRAM-SHA-256 verifiers only, never a password.
CREATE TABLE platform.org_logins (
  org_id        UUID PRIMARY KEY REFERENCES platform.organizations(id) ON DELETE CASCADE,
  scram_verifier TEXT NOT NULL CHECK (scram_verifier LIKE 'SCRAM-SHA-256$%'),
  updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A backend per (org, database name); the DSN is Fernet-encrypted with O7S_SECRET_KEY.
CREATE TABLE platform.database_credentials (
  id                 UUID PRIMARY KEY DEFAULT gen_random_uuid(),
  org_id             UUID NOT NULL REFERENCES platform.organizations(id) ON DELETE CASCADE,
  db_name            TEXT NOT NULL,
  database_type      TEXT NOT NULL CHECK (database_type IN ('postgres', 'neon')),
  connection_string  BYTEA NOT NULL,
  is_active          BOOLEAN NOT NULL DEFAULT true,
  created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
  UNIQUE (org_id, db_name)
);

-- Proves which secret key encrypted the rows above, so a wrong key fails before anything is written.
CREATE TABLE platform.secret_key_check (
  id     BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
  token  BYTEA NOT NULL
);

CREATE TABLE platform.usage_metrics (
  id              UUID PRIMARY KEY,
  org_id          UUID REFERENCES platform.organizations(id) ON DELETE SET NULL,
  database_type   TEXT,
  vcpu_hours      NUMERIC(14,6) NOT NULL DEFAULT 0,
  memory_gb_hours NUMERIC(14,6) NOT NULL DEFAULT 0,
  query_count     BIGINT NOT NULL DEFAULT 0,
  storage_gb      NUMERIC(10,2) NOT NULL DEFAULT 0,
  period_start    TIMESTAMPTZ NOT NULL,
  period_end      TIMESTAMPTZ NOT NULL
);
CREATE INDEX usage_metrics_org_period ON platform.usage_metrics (org_id, period_start);
