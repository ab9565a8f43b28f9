"""Alembic migrations, shipped as package data so `inspect db upgrade` works when installed."""
