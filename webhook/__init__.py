"""Promotion Gate: admit only image digests promoted to the target environment."""

__version__ = "0.1.0"
