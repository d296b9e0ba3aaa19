"""Money in: packages, checkout, payment webhooks, the Stripe adapter, x402 top-ups, refunds, referrals.

Every path lands as a grant through `AdminOps.grant` (the ledger row first, then Redis, then applied),
idempotent by its order or event id; credits go back out through the debit script (`Balances.debit`)."""
