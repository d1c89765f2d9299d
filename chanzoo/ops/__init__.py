"""Shared compute pieces used by several model families."""
