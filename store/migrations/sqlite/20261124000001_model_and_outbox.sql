-- The model store (users, entities with attribute definitions, entries with
-- attribute values) and the transactional outbox. Times are RFC 3339 text;
-- JSON columns are text; flags are 0/1 (the Any driver reads no SQLite BOOLEAN).
-- Soft-deleted rows keep is_active = 0.

CREATE TABLE users (
    id           INTEGER PRIMARY KEY,
    username     TEXT    NOT NULL UNIQUE,
    email        TEXT    NOT NULL DEFAULT '',
    first_name   TEXT    NOT NULL DEFAULT '',
    last_name    TEXT    NOT NULL DEFAULT '',
    is_active    INTEGER NOT NULL DEFAULT 1,
    is_superuser INTEGER NOT NULL DEFAULT 0,
    date_joined  TEXT    NOT NULL
);

CREATE TABLE entities (
    id              INTEGER PRIMARY KEY,
    name            TEXT    NOT NULL,
    note            TEXT    NOT NULL DEFAULT '',
    is_active       INTEGER NOT NULL DEFAULT 1,
    created_time    TEXT    NOT NULL,
    created_user_id BIGINT  NULL,
    created_user    TEXT    NULL,
    updated_time    TEXT    NOT NULL
);
CREATE UNIQUE INDEX entities_active_name ON entities (name) WHERE is_active;

CREATE TABLE entity_attrs (
    id                 INTEGER PRIMARY KEY,
    entity_id          BIGINT  NOT NULL REFERENCES entities (id),
    name               TEXT    NOT NULL,
    type               INTEGER NOT NULL,
    is_mandatory       INTEGER NOT NULL DEFAULT 0,
    referral           TEXT    NOT NULL DEFAULT '[]',
    position           INTEGER NOT NULL DEFAULT 0,
    is_summarized      INTEGER NOT NULL DEFAULT 0,
    is_delete_in_chain INTEGER NOT NULL DEFAULT 0,
    note               TEXT    NOT NULL DEFAULT '',
    default_value      TEXT    NULL,
    is_active          INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX entity_attrs_entity ON entity_attrs (entity_id);

CREATE TABLE entries (
    id              INTEGER PRIMARY KEY,
    entity_id       BIGINT  NOT NULL REFERENCES entities (id),
    name            TEXT    NOT NULL,
    note            TEXT    NOT NULL DEFAULT '',
    is_active       INTEGER NOT NULL DEFAULT 1,
    created_time    TEXT    NOT NULL,
    created_user_id BIGINT  NULL,
    created_user    TEXT    NULL,
    updated_time    TEXT    NOT NULL
);
CREATE INDEX entries_entity ON entries (entity_id);
CREATE UNIQUE INDEX entries_active_name ON entries (entity_id, name) WHERE is_active;

CREATE TABLE attribute_values (
    id       INTEGER PRIMARY KEY,
    entry_id BIGINT NOT NULL REFERENCES entries (id),
    attr_id  BIGINT NOT NULL REFERENCES entity_attrs (id),
    value    TEXT   NOT NULL,
    UNIQUE (entry_id, attr_id)
);

-- The outbox: one row per event, written in the transaction of the model
-- change. The relay publishes rows in id order per object and deletes them
-- once the stream has acknowledged them. See docs/outbox.md.
CREATE TABLE hookbus_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT    NOT NULL UNIQUE,
    hook        TEXT    NOT NULL,
    entity      TEXT    NOT NULL,
    object      TEXT    NOT NULL,
    traceparent TEXT    NULL,
    payload     TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
);
