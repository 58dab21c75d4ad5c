"""CLI command modules, one per noun; ``broker/cli.py`` assembles them into ``medbroker``."""

# These modules (and broker/cli.py) deliberately avoid ``from __future__ import annotations``: typer
# resolves string annotations with eval() on every start, which made each command about 3x slower.
