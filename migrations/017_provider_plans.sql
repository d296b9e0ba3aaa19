-- Provider-billed subscription plans (sidecar/documents/plan_invoices.py): a subscription billed by
-- Stripe names its Stripe subscription (at most one of ours per Stripe subscription), and each period a
-- paid Stripe invoice granted records that invoice.
ALTER TABLE subscriptions ADD COLUMN provider_ref text COLLATE "C";  -- the Stripe subscription id
CREATE UNIQUE INDEX subscriptions_provider_ref ON subscriptions (provider_ref) WHERE provider_ref IS NOT NULL;
ALTER TABLE subscription_periods ADD COLUMN invoice_ref text COLLATE "C";  -- the Stripe invoice it paid
