-- How fast this machine's Postgres alone stores rows of the `changes` table's shape (≈ 450
-- bytes each, the same indexes), generated inside the server: no client, no parsing, 256 rows
-- per transaction, 20,480 rows. The ingest bench's ceiling from the database's side.
--
--   psql -h 127.0.0.1 -U postgres -d postgres -c 'CREATE DATABASE server_insert'
--   psql -h 127.0.0.1 -U postgres -d server_insert -f relay/benches/server_insert.sql
--   psql -h 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE server_insert'
CREATE TABLE stands (stand TEXT PRIMARY KEY);
INSERT INTO stands VALUES ('s');
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
CREATE INDEX changes_by_hash ON changes (stand, hash);
\timing on
DO $$
DECLARE t int;
BEGIN
  FOR t IN 0..79 LOOP
    INSERT INTO changes (stand, actor, seq, hash, deps, bytes, signature, at_ms, received_at)
    SELECT 's', 'a' || (g % 10), t * 256 + g, sha256(int8send(t * 256 + g)),
           sha256(int8send(g)), convert_to(repeat(md5(g::text), 10), 'UTF8'),
           sha256(int8send(g)) || sha256(int8send(g + 1)), 0, 0
    FROM generate_series(1, 256) g;
    COMMIT;
  END LOOP;
END $$;
SELECT count(*) AS rows, avg(length(bytes) + length(hash) + length(deps) + length(signature)) AS bytes_per_row
FROM changes;
