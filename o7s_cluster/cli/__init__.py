"""The `o7s` command: `main` (parser, control-plane commands, `o7s serve`), `ctl` (`o7s ctl`, the admin
port's client) and `usage` (`o7s usage`, `o7s bill`)."""
