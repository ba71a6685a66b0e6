-- The commands log as the workers knew it, so that a log that changed under them (a topic
-- deleted and re-created, commands deleted by retention before they were consumed, more
-- partitions) is noticed and halts processing instead of being consumed silently.

-- The Kafka timestamp (milliseconds) of the message at `next_offset - 1`, the last one
-- applied: a worker taking the partition reads that message again and compares, so a topic
-- re-created and grown past the stored offset is not mistaken for the log it replaced.
-- NULL when unknown (a rewound or accepted position, or rows older than this column).
ALTER TABLE partitions ADD COLUMN last_timestamp BIGINT;

-- The partition count of each commands topic, recorded by the first worker that ran on it.
-- Keys are routed by `murmur2(key) mod count`: a different count moves keys to other
-- partitions, so workers halt the topic until an operator accepts the new count.
CREATE TABLE topic_layouts (
    topic       TEXT        PRIMARY KEY,
    partitions  INTEGER     NOT NULL CHECK (partitions > 0),
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What operators accepted about a commands log (`cmdproc topics accept-log`,
-- `cmdproc topics accept-partitions`), with their reason: the audit trail of every
-- deliberate jump in a partition's position and every change of partition count.
CREATE TABLE log_decisions (
    id          BIGSERIAL   PRIMARY KEY,
    topic       TEXT        NOT NULL,
    decision    TEXT        NOT NULL,
    partition   INTEGER,
    from_value  BIGINT,
    to_value    BIGINT      NOT NULL,
    why         TEXT        NOT NULL,
    decided_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
