"""Documents of the account: billing profiles and tax, subscription plans (and, later, invoices)."""
