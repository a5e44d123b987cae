"""The client matrix's Django app: two models with a foreign key, a unique and a check constraint."""


class MigrateDefaultOnly:
    """All three aliases reach one database: only `default` migrates it."""

    def allow_migrate(self, db, app_label, **hints):
        return db == "default"
