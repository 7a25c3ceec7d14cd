"""Subcommands of the `treedistill` CLI; see `treedistill/cli.py` for the contract."""
