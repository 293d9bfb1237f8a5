"""The `zerostack` command: one Typer sub-app per subsystem."""
