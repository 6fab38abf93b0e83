"""Launcher environments, process groups and ZeRO-3 helpers; kept apart from adapter math."""
