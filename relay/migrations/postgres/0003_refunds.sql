-- Refunds for units sold beyond a stand's stock, decided by the reconciler.
--
-- A decision refunds some units of one sale line. It is never undone: a trigger refuses UPDATE
-- and DELETE, and (stand, sale_id, sku) is unique, so a second decision for the same line is
-- impossible however many reconcilers run. A later void or restock shows beside it (the sale's
-- `voided`, the item's `available`), it does not change it.
CREATE TABLE refund_decisions (
    id           BIGSERIAL PRIMARY KEY,
    stand        TEXT NOT NULL REFERENCES stands (stand),
    sale_id      TEXT NOT NULL,
    sku          TEXT NOT NULL,
    units        BIGINT NOT NULL CHECK (units > 0),
    amount_cents BIGINT NOT NULL CHECK (amount_cents >= 0),
    method       TEXT NOT NULL,
    reference    TEXT NOT NULL,
    -- The item's `available` when this was decided (negative).
    available    BIGINT NOT NULL,
    decided_at   BIGINT NOT NULL,
    UNIQUE (stand, sale_id, sku)
);

CREATE FUNCTION refund_decisions_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a refund decision is never undone: % refused', TG_OP;
END
$$;

CREATE TRIGGER refund_decisions_no_update_or_delete BEFORE UPDATE OR DELETE ON refund_decisions
    FOR EACH ROW EXECUTE FUNCTION refund_decisions_final();

-- The outbox: one row per decision, written in the decision's transaction. `pending` rows are
-- leased by a worker (`lease_until`), paid back through Stripe and end `done`, or `dead` with
-- the reason after too many attempts or a refusal. Cash is `manual` until a manager marks it
-- `paid_out`.
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
