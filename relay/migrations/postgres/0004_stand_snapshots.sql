-- A snapshot of each stand's replica at the relay (`Ledger::snapshot`), so a restart loads it
-- and replays only the changes stored after it. Not part of the record: replaced as the stand
-- grows, checked when loaded, and never needed (without it the stand replays `changes`).
CREATE TABLE stand_snapshots (
    stand      TEXT PRIMARY KEY REFERENCES stands (stand),
    covers     BIGINT NOT NULL,
    bytes      BYTEA NOT NULL,
    written_at BIGINT NOT NULL
);
