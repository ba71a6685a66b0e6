-- Poison commands park their aggregate: the failing command and every later command for
-- the same aggregate are set aside in offset order, while other aggregates go on.

CREATE TABLE parked_aggregates (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    first_offset   BIGINT  NOT NULL,
    parked_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

CREATE TABLE parked_commands (
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    "offset"       BIGINT  NOT NULL,
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    source         TEXT    NOT NULL,
    command_id     TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    parked_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
CREATE INDEX parked_commands_aggregate ON parked_commands (aggregate_type, aggregate_id, partition, "offset");
