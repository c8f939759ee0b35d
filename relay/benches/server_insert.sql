-- How fast this machine's Postgres alone stores rows into the relay's own `changes` table (its
-- migrations, so the same columns, indexes and trigger; ≈ 450 bytes a row), the rows made
-- inside the server: no client, no parsing, 256 rows per transaction, 20,480 rows. The
-- ingest bench's ceiling from the database's side. From the repository's top:
--
--   psql -h 127.0.0.1 -U postgres -d postgres -c 'CREATE DATABASE server_insert'
--   psql -h 127.0.0.1 -U postgres -d server_insert -f relay/benches/server_insert.sql
--   psql -h 127.0.0.1 -U postgres -d postgres -c 'DROP DATABASE server_insert'
\set QUIET on
\i relay/migrations/postgres/0001_init.sql
\i relay/migrations/postgres/0002_stand_network_key.sql
\i relay/migrations/postgres/0003_refunds.sql
\i relay/migrations/postgres/0004_stand_snapshots.sql
\i relay/migrations/postgres/0005_admin_requests.sql
\i relay/migrations/postgres/0006_reads.sql
INSERT INTO stands (stand, pool_key, placement, created_at) VALUES ('s', 'k', 'device', 0);
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
\timing off
SELECT count(*) AS rows, avg(length(bytes) + length(hash) + length(deps) + length(signature)) AS bytes_per_row
FROM changes;
