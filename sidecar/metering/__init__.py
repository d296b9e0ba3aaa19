"""Metering beyond tokens: operation holds, recurring charges, idempotency keys on inference."""
