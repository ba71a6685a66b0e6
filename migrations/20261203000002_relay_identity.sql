-- The relay's identity and what it needs to publish every outbox row exactly once without
-- trusting positions it did not write.

-- One row: this database's deployment id, generated when the database is migrated. A
-- database restored from a backup keeps it; a database built anew gets a new one. The
-- relay names its Kafka transactional ids and offsets group after it, and tags the offsets
-- it commits with it, so it trusts only positions written by the same deployment.
CREATE TABLE relay_identity (
    singleton   BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    deployment  UUID    NOT NULL DEFAULT gen_random_uuid(),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO relay_identity DEFAULT VALUES;

-- A stable identity per outbox row, the same however the row is re-derived (after a
-- restore, a redrive, a skip): the event id for an event, `dead-letter/<topic>/<partition>/
-- <offset>` for a dead letter. The relay publishes it as the `cmdproc-message-id` header.
ALTER TABLE outbox ADD COLUMN message_id TEXT;

-- Identities a relay found already on the destination topics (published by this deployment
-- for this commands partition) when its Kafka position could not be trusted to be exactly
-- the recorded one: the outbox rows with these identities are skipped, not sent again, and
-- the entry is deleted. Kept until the rows are re-derived, across relay restarts; pruned
-- after the dedupe window.
CREATE TABLE relay_published (
    commands_topic TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    message_id     TEXT    NOT NULL,
    found_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (commands_topic, partition, message_id)
);
CREATE INDEX relay_published_found_at ON relay_published (found_at);
