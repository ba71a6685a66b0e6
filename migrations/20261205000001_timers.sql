-- Durable timers: a command an aggregate's handler scheduled for a time, by name per
-- aggregate (scheduling the name again replaces it). Written in the handler's transaction;
-- the owner of `partition` (the scheduling aggregate's) fires a due timer by writing its
-- command to the outbox in the transaction that deletes the row, fenced by the partition's
-- epoch. `payload` is the whole command (a structured CloudEvent whose id is derived from
-- the timer, whose time is `due_at`), keyed by `subject`.
CREATE TABLE timers (
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    name           TEXT        NOT NULL,
    commands_topic TEXT        NOT NULL,
    partition      INTEGER     NOT NULL,
    due_at         TIMESTAMPTZ NOT NULL,
    subject        TEXT        NOT NULL,
    message_id     TEXT        NOT NULL,
    payload        BYTEA       NOT NULL,
    scheduled_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, name)
);
CREATE INDEX timers_due ON timers (commands_topic, partition, due_at);
