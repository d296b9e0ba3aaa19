"""Documents: billing profiles and tax (and, later, invoices and plans)."""
