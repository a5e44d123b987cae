"""Token logins: JWTs (tokens.py, keys from jwks.py) and API keys (apikeys.py), checked without a network call
per login. The trio login (net/login.py) asks for the token and calls these; nothing here does I/O on a
login's path."""
