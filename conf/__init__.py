"""Hydra config tree, installed as the package ntp_rl.conf (see pyproject.toml)."""
