-- See the Postgres migration of this number.
CREATE INDEX changes_by_hash ON changes (stand, hash);
ALTER TABLE stand_snapshots ADD COLUMN upto BIGINT;
CREATE INDEX sales_by_time ON sales (stand, at_ms, sale_id);
