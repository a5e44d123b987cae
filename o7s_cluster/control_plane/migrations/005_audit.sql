-- Audit log and analytics events (issue 13.4, 13.5). Rows are written by the usage shipper (workers and the
-- supervisor's admin port: INSERT ... ON CONFLICT (id) DO NOTHING, so a batch sent twice changes nothing) and
-- by the CLI (org, tier and API-key changes). Data-plane events are aggregated per window: `count` of the same
-- (kind, org, actor, source, method, detail) between period_start and at. The columns are a stable interface
-- (the dashboard reads id, at, org, kind, actor, source, method, detail, count).
CREATE TABLE platform.audit_log (
  id           UUID PRIMARY KEY,
  at           TIMESTAMPTZ NOT NULL,
  org          TEXT,
  org_id       UUID REFERENCES platform.organizations(id) ON DELETE SET NULL,
  kind         TEXT NOT NULL,
  actor        TEXT,
  source       TEXT,
  method       TEXT,
  detail       JSONB NOT NULL DEFAULT '{}',
  count        BIGINT NOT NULL DEFAULT 1 CHECK (count > 0),
  worker       TEXT,
  period_start TIMESTAMPTZ,
  recorded_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_at ON platform.audit_log (at);
CREATE INDEX audit_log_org_at ON platform.audit_log (org, at);
CREATE INDEX audit_log_kind_at ON platform.audit_log (kind, at);

CREATE TABLE platform.analytics_events (
  id             UUID PRIMARY KEY,
  at             TIMESTAMPTZ NOT NULL,
  kind           TEXT NOT NULL,
  org            TEXT NOT NULL,
  org_id         UUID REFERENCES platform.organizations(id) ON DELETE SET NULL,
  from_tier      TEXT,
  suggested_tier TEXT,
  reason         TEXT NOT NULL,
  counts         JSONB NOT NULL DEFAULT '{}',
  worker         TEXT,
  period_start   TIMESTAMPTZ,
  recorded_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX analytics_events_org_at ON platform.analytics_events (org, at);
CREATE INDEX analytics_events_at ON platform.analytics_events (at);
