-- Usage attribution (issue 5): one row per (org, database type, worker, window), written by the usage
-- shipper with INSERT ... ON CONFLICT (id) DO NOTHING, so a batch sent twice changes nothing.
-- The estimates get more precision: a 10-second window of short queries is a few 1e-8 vCPU-hours.
ALTER TABLE platform.usage_metrics
  ALTER COLUMN vcpu_hours      TYPE NUMERIC(24,12),
  ALTER COLUMN memory_gb_hours TYPE NUMERIC(24,12),
  ADD COLUMN org_name          TEXT,
  ADD COLUMN worker            TEXT,
  ADD COLUMN tier              TEXT,
  ADD COLUMN error_count       BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN throttled_count   BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN refused_count     BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN bytes_in          BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN bytes_out         BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN row_count         BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN query_seconds     DOUBLE PRECISION NOT NULL DEFAULT 0,
  ADD COLUMN backend_seconds   DOUBLE PRECISION NOT NULL DEFAULT 0,
  ADD COLUMN peak_connections  INT NOT NULL DEFAULT 0,
  ADD COLUMN auth_failures     BIGINT NOT NULL DEFAULT 0,
  ADD COLUMN recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now();

-- Monthly billing scans by period; `o7s usage ORG` uses usage_metrics_org_period (001).
CREATE INDEX usage_metrics_period ON platform.usage_metrics (period_start);
CREATE INDEX usage_metrics_org_name_period ON platform.usage_metrics (org_name, period_start);
