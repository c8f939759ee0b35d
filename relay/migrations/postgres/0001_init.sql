-- The relay's store of record. `changes` is append-only: a trigger refuses UPDATE, DELETE and
-- TRUNCATE, and (stand, actor, seq) is unique so a fork of any replica's sequence can never be
-- stored. Everything else is a projection rebuilt from `changes` by replaying them.

CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE stands (
    stand       TEXT PRIMARY KEY,
    pool_key    TEXT NOT NULL,
    -- 'relay': the relay signs as the stand's pool; 'device': the pool is a stand device.
    placement   TEXT NOT NULL CHECK (placement IN ('relay', 'device')),
    pool_secret BYTEA,
    created_at  BIGINT NOT NULL
);

CREATE TABLE changes (
    id          BIGSERIAL PRIMARY KEY,
    stand       TEXT NOT NULL REFERENCES stands (stand),
    actor       TEXT NOT NULL,
    seq         BIGINT NOT NULL CHECK (seq >= 1),
    hash        BYTEA NOT NULL,
    deps        BYTEA NOT NULL,
    bytes       BYTEA NOT NULL,
    signature   BYTEA NOT NULL,
    at_ms       BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    UNIQUE (stand, actor, seq)
);

CREATE FUNCTION changes_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'changes is append-only: % refused', TG_OP;
END
$$;

CREATE TRIGGER changes_no_update_or_delete BEFORE UPDATE OR DELETE ON changes
    FOR EACH ROW EXECUTE FUNCTION changes_append_only();
CREATE TRIGGER changes_no_truncate BEFORE TRUNCATE ON changes
    FOR EACH STATEMENT EXECUTE FUNCTION changes_append_only();

CREATE TABLE items (
    stand       TEXT NOT NULL REFERENCES stands (stand),
    sku         TEXT NOT NULL,
    name        TEXT NOT NULL,
    price_cents BIGINT NOT NULL,
    total_in    BIGINT NOT NULL,
    available   BIGINT NOT NULL,
    marked_off  BIGINT NOT NULL,
    PRIMARY KEY (stand, sku)
);

CREATE TABLE rights (
    stand   TEXT NOT NULL REFERENCES stands (stand),
    sku     TEXT NOT NULL,
    replica TEXT NOT NULL,
    units   BIGINT NOT NULL,
    PRIMARY KEY (stand, sku, replica)
);

CREATE TABLE sales (
    stand       TEXT NOT NULL REFERENCES stands (stand),
    sale_id     TEXT NOT NULL,
    replica     TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    at_ms       BIGINT NOT NULL,
    lines       TEXT NOT NULL,
    units       BIGINT NOT NULL,
    total_cents BIGINT NOT NULL,
    method      TEXT NOT NULL,
    reference   TEXT NOT NULL,
    offline     BIGINT NOT NULL,
    voided      BIGINT NOT NULL,
    PRIMARY KEY (stand, sale_id)
);

CREATE TABLE rejections (
    stand   TEXT NOT NULL,
    replica TEXT NOT NULL,
    rule    TEXT NOT NULL,
    count   BIGINT NOT NULL,
    PRIMARY KEY (stand, replica, rule)
);

CREATE TABLE tokens (
    hash       TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'manager', 'admin')),
    created_at BIGINT NOT NULL
);
