-- API tokens of the reference host (only a SHA-256 hash of each key is kept)
-- and jobs (plugin tasks). Times are RFC 3339 text; flags are 0/1.

CREATE TABLE api_tokens (
    id             INTEGER PRIMARY KEY,
    user_id        BIGINT  NOT NULL REFERENCES users (id),
    key_hash       TEXT    NOT NULL UNIQUE,
    name           TEXT    NOT NULL DEFAULT '',
    created_time   TEXT    NOT NULL,
    last_used_time TEXT    NULL,
    is_active      INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE jobs (
    id           INTEGER PRIMARY KEY,
    user_id      BIGINT  NULL,
    operation    BIGINT  NOT NULL,
    plugin_id    TEXT    NULL,
    task         TEXT    NOT NULL,
    params       TEXT    NOT NULL DEFAULT 'null',
    status       INTEGER NOT NULL,
    message      TEXT    NOT NULL DEFAULT '',
    created_time TEXT    NOT NULL,
    updated_time TEXT    NOT NULL
);
CREATE INDEX jobs_user ON jobs (user_id, id);
