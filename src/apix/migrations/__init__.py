"""Alembic migrations of the APIX schema (date-named revision files in `versions/`)."""
