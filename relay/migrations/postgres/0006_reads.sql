-- A stand's replica here keeps the signed bytes of its changes in this table only and reads
-- them by hash when a replica needs them.
CREATE INDEX changes_by_hash ON changes (stand, hash);
-- The highest `changes.id` of the stand when its snapshot was written: a restart reads and
-- replays only the changes after it (and fetches, like any instance, what other instances
-- stored that it lacks).
ALTER TABLE stand_snapshots ADD COLUMN upto BIGINT;
-- The sales listing pages through a stand's sales latest first.
CREATE INDEX sales_by_time ON sales (stand, at_ms, sale_id);
