"""The control plane: the `platform` schema and its SQL migrations (`migrations/`), org administration and
the proxy's cached lookups (`catalog`), encryption of backend DSNs (`vault`), DSN parsing (`dsn`), and the
throwaway local PostgreSQL of a bare `o7s serve` (`embedded`)."""
