"""CLI subcommands (see megasora/cli.py)."""
