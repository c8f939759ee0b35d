-- Admin operations queued for a stand device's pool (see the Postgres migration of this number).
CREATE TABLE admin_requests (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
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
