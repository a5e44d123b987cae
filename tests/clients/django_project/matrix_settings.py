"""A minimal Django settings module for the client matrix: one app, Django's PostgreSQL backend on
psycopg 3, pointed at a real `o7s serve` by the workload's environment (O7S_HOST, ...)."""

import os

SECRET_KEY = "client-matrix-only"  # nothing here is served or signed
INSTALLED_APPS = ["django.contrib.contenttypes", "matrix_app"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_DB = {
    "ENGINE": "django.db.backends.postgresql",
    "HOST": os.environ["O7S_HOST"],
    "PORT": os.environ["O7S_PORT"],
    "USER": os.environ["O7S_USER"],
    "PASSWORD": os.environ["O7S_PASSWORD"],
    "NAME": os.environ["O7S_DB"],
    "OPTIONS": {"connect_timeout": 10, "sslmode": "disable"},
}
DATABASES = {
    # Django's defaults: client-side binding, no prepared statements, a connection per thread.
    "default": _DB,
    # Server-side binding with psycopg preparing every statement (named prepared statements).
    "bound": {**_DB, "OPTIONS": {**_DB["OPTIONS"], "server_side_binding": True, "prepare_threshold": 0}},
    # Django 5.1+'s connection pool (psycopg_pool).
    "pooled": {**_DB, "OPTIONS": {**_DB["OPTIONS"], "pool": {"min_size": 2, "max_size": 8, "timeout": 20}}},
}
DATABASE_ROUTERS = ["matrix_app.MigrateDefaultOnly"]
