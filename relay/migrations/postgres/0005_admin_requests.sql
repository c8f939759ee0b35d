-- Admin operations for a stand whose pool is a stand device. The relay cannot sign them, so it
-- queues each here and carries it to the pool over the uplink whenever the pool is connected;
-- the pool makes it once (the request id travels in its change) and answers. `queued` until
-- the pool answers, then `done` (with the pool change that made it) or `refused` (with why).
CREATE TABLE admin_requests (
    id         BIGSERIAL PRIMARY KEY,
    stand      TEXT NOT NULL REFERENCES stands (stand),
    kind       TEXT NOT NULL,
    op         TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('queued', 'done', 'refused')),
    pool_seq   BIGINT,
    detail     TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX admin_requests_open ON admin_requests (stand, id) WHERE status = 'queued';
