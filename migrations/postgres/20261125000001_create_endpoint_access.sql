-- One row per counted API endpoint. Rows appear on first access; unknown paths are never stored.
CREATE TABLE IF NOT EXISTS endpoint_access (
    endpoint        TEXT        PRIMARY KEY,
    access_count    BIGINT      NOT NULL CHECK (access_count >= 0),
    first_accessed  TIMESTAMPTZ NOT NULL,
    last_accessed   TIMESTAMPTZ NOT NULL
);
