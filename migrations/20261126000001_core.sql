-- Core tables of the single-writer processor.

-- One row per commands-topic partition: the fencing epoch, the next offset to consume,
-- and the last outbox sequence number the partition's owner handed out. Only the worker
-- holding the current epoch may advance next_offset and outbox_seq.
CREATE TABLE partitions (
    topic        TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    epoch        BIGINT  NOT NULL DEFAULT 0,
    next_offset  BIGINT  NOT NULL DEFAULT 0,
    outbox_seq   BIGINT  NOT NULL DEFAULT 0,
    owner        TEXT,
    acquired_at  TIMESTAMPTZ,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- Aggregate state, written with a version check.
CREATE TABLE aggregates (
    aggregate_type TEXT   NOT NULL,
    aggregate_id   TEXT   NOT NULL,
    version        BIGINT NOT NULL,
    state          JSONB  NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- The idempotent consumer: the outcome of every processed command, keyed by (source, id).
CREATE TABLE processed_commands (
    source         TEXT    NOT NULL,
    command_id     TEXT    NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    command_type   TEXT    NOT NULL,
    outcome        TEXT    NOT NULL CHECK (outcome IN ('applied', 'rejected')),
    reason         TEXT,
    version        BIGINT  NOT NULL,
    event_ids      UUID[]  NOT NULL,
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    "offset"       BIGINT  NOT NULL,
    processed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, command_id)
);
CREATE INDEX processed_commands_aggregate ON processed_commands (aggregate_type, aggregate_id, processed_at);
CREATE INDEX processed_commands_processed_at ON processed_commands (processed_at);

-- Every duplicate delivery seen, pointing at the original outcome.
CREATE TABLE duplicate_deliveries (
    topic        TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    "offset"     BIGINT  NOT NULL,
    source       TEXT    NOT NULL,
    command_id   TEXT    NOT NULL,
    seen_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);

-- Events emitted by applied commands, kept for inspection and verification.
CREATE TABLE events (
    event_id       UUID    PRIMARY KEY,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    version        BIGINT  NOT NULL,
    event_type     TEXT    NOT NULL,
    data           JSONB   NOT NULL,
    source         TEXT    NOT NULL,
    command_id     TEXT    NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (aggregate_type, aggregate_id, version)
);

-- Messages rejected before they reached a handler, with their original bytes.
CREATE TABLE dead_letters (
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    "offset"       BIGINT  NOT NULL,
    kind           TEXT    NOT NULL,
    message        TEXT    NOT NULL,
    key            BYTEA,
    value          BYTEA,
    headers        JSONB   NOT NULL DEFAULT '[]',
    aggregate_type TEXT,
    aggregate_id   TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
CREATE INDEX dead_letters_kind ON dead_letters (kind);

-- Messages to publish, numbered per commands partition by its fenced owner.
CREATE TABLE outbox (
    commands_topic TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    seq            BIGINT  NOT NULL,
    topic          TEXT    NOT NULL,
    key            BYTEA,
    payload        BYTEA,
    headers        JSONB   NOT NULL DEFAULT '[]',
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (commands_topic, partition, seq)
);

-- The relay's position per commands partition: every outbox row with seq <= published_seq
-- has been published. A relay holds the row's lock while it publishes, so one relay at a
-- time works a partition, in order.
CREATE TABLE relay_positions (
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    published_seq  BIGINT  NOT NULL DEFAULT 0,
    published_at   TIMESTAMPTZ,
    PRIMARY KEY (topic, partition)
);
