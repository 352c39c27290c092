-- One row per counted API endpoint. Rows appear on first access; unknown paths are never stored.
-- Timestamps are RFC 3339 UTC text, the representation sqlx uses for chrono on SQLite.
CREATE TABLE IF NOT EXISTS endpoint_access (
    endpoint        TEXT    PRIMARY KEY NOT NULL,
    access_count    INTEGER NOT NULL CHECK (access_count >= 0),
    first_accessed  TEXT    NOT NULL,
    last_accessed   TEXT    NOT NULL
);
