"""Runwarden: keeps Cloud Run services holding the declared env vars, invokers and settings."""
