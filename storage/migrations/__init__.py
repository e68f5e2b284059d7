"""Alembic migration environment for storage (a package so that setuptools ships env.py)."""
