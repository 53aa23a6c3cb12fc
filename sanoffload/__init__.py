"""sanoffload: off-host ("server-free") backup for Linux."""

__version__ = "0.1.0"
