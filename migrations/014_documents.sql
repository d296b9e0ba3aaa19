-- Issued documents (sidecar/documents/issuing.py): invoices, receipts and credit notes.
--
-- Numbers are gap-free and strictly increasing per issuer: the issuing transaction takes the next number
-- from `document_series` (UPDATE ... RETURNING holds the issuer's row lock until commit), so numbers are
-- handed out in commit order and a rolled-back issue gives its number back. A document is immutable once
-- written (the trigger below refuses UPDATE and DELETE); what happens to it later, payments, is recorded
-- beside it in `document_payments`, which is append-only too.
CREATE TABLE document_series (
    issuer    text COLLATE "C" PRIMARY KEY,
    last_seq  bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    last_at   timestamptz  -- the last one's issue time: a later number is never dated earlier
);

CREATE TABLE documents (
    id             text COLLATE "C" PRIMARY KEY,
    issuer         text COLLATE "C" NOT NULL REFERENCES document_series (issuer),
    seq            bigint NOT NULL CHECK (seq > 0),
    number         text COLLATE "C" NOT NULL UNIQUE,
    kind           text NOT NULL CHECK (kind IN ('invoice', 'receipt', 'credit_note')),
    account_id     text COLLATE "C" NOT NULL REFERENCES accounts (id),
    source         text COLLATE "C" NOT NULL UNIQUE,       -- what caused it: at most one document each
    issued_at      timestamptz NOT NULL,
    due_at         timestamptz,
    currency       text NOT NULL,
    gross_minor    bigint NOT NULL CHECK (gross_minor >= 0),
    credits        bigint NOT NULL CHECK (credits >= 0),  -- micro-credits it accounts for
    refers_to      text COLLATE "C" REFERENCES documents (id),
    body           jsonb NOT NULL,                         -- the document as issued (snapshots included)
    UNIQUE (issuer, seq)
);
CREATE INDEX documents_account ON documents (account_id, issued_at DESC);
CREATE INDEX documents_open ON documents (due_at) WHERE kind = 'invoice';

-- A payment of an invoice, once per payment id (a manual settlement's id, a provider's payment id).
CREATE TABLE document_payments (
    payment_id    text COLLATE "C" PRIMARY KEY,
    document_id   text COLLATE "C" NOT NULL REFERENCES documents (id),
    amount_minor  bigint NOT NULL CHECK (amount_minor > 0),
    method        text NOT NULL,
    paid_at       timestamptz NOT NULL
);
CREATE INDEX document_payments_document ON document_payments (document_id);

CREATE FUNCTION documents_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'issued documents and their payments are immutable (% on %)', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER documents_immutable BEFORE UPDATE OR DELETE ON documents
    FOR EACH ROW EXECUTE FUNCTION documents_immutable();
CREATE TRIGGER document_payments_immutable BEFORE UPDATE OR DELETE ON document_payments
    FOR EACH ROW EXECUTE FUNCTION documents_immutable();
