-- Redis as a tenant database (issue 12): database_credentials may hold a redis:// URL, encrypted like
-- the Postgres DSNs; usage records carry database_type 'redis'.
ALTER TABLE platform.database_credentials DROP CONSTRAINT IF EXISTS database_credentials_database_type_check;
ALTER TABLE platform.database_credentials ADD CONSTRAINT database_credentials_database_type_check
  CHECK (database_type IN ('postgres', 'neon', 'redis'));
