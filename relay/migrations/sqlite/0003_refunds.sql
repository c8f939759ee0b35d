-- Refunds for units sold beyond a stand's stock, decided by the reconciler (see the Postgres
-- migration of the same number for what each column means).
CREATE TABLE refund_decisions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    stand        TEXT NOT NULL REFERENCES stands (stand),
    sale_id      TEXT NOT NULL,
    sku          TEXT NOT NULL,
    units        BIGINT NOT NULL CHECK (units > 0),
    amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
    method       TEXT NOT NULL,
    reference    TEXT NOT NULL,
    available    BIGINT NOT NULL,
    decided_at   BIGINT NOT NULL,
    UNIQUE (stand, sale_id, sku)
);

CREATE TRIGGER refund_decisions_no_update BEFORE UPDATE ON refund_decisions
BEGIN
    SELECT RAISE(ABORT, 'a refund decision is never undone: UPDATE refused');
END;
CREATE TRIGGER refund_decisions_no_delete BEFORE DELETE ON refund_decisions
BEGIN
    SELECT RAISE(ABORT, 'a refund decision is never undone: DELETE refused');
END;

CREATE TABLE refund_outbox (
    decision_id     BIGINT PRIMARY KEY REFERENCES refund_decisions (id),
    status          TEXT NOT NULL CHECK (status IN ('pending', 'done', 'dead', 'manual', 'paid_out')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_until     BIGINT NOT NULL DEFAULT 0,
    leased_by       TEXT,
    stripe_refund   TEXT,
    last_error      TEXT,
    updated_at      BIGINT NOT NULL,
    paid_out_by     TEXT
);

CREATE INDEX refund_outbox_due ON refund_outbox (status, next_attempt_at);
