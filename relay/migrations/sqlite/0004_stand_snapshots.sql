-- A snapshot of each stand's replica at the relay (see the Postgres migration of this number).
CREATE TABLE stand_snapshots (
    stand      TEXT PRIMARY KEY REFERENCES stands (stand),
    covers     BIGINT NOT NULL,
    bytes      BLOB NOT NULL,
    written_at BIGINT NOT NULL
);
