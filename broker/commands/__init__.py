"""CLI command modules, one per noun; ``broker/cli.py`` assembles them into ``medbroker``."""
