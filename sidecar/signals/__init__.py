"""Signals: alerts, outgoing signed webhooks and email, auto-reload (see features.py for the wiring)."""
