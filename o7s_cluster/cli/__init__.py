"""The `o7s` command (console script `o7s_cluster.cli.main:main`, also `python -m o7s_cluster`).

Modules:
    main.py     the parser and `main`: errors to exit codes
    common.py   what the subcommand modules share (error types, parser class, DSN/key/JSON helpers)
    org.py      `o7s migrate`, `o7s keygen`, `o7s org ...`
    serve.py    `o7s serve`
    ctl.py      `o7s ctl ...`: the admin port's client
    usage.py    `o7s usage ORG`, `o7s bill --period`
Subcommand modules import only common.py of cli/; main imports them all.
"""
