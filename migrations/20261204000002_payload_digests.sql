-- A digest of what each command asked for (UUIDv5 of its type, subject and data, see
-- commands::envelope::payload_digest), recorded with its outcome, so that a later command
-- reusing its idempotency key (source, id) with another payload is told from a re-delivery
-- and refused as `key_reused`. Outcomes recorded before this migration, skips, and outcomes
-- rebuilt from stored events after pruning have none: every later delivery of those is a
-- plain duplicate.
ALTER TABLE processed_commands ADD COLUMN digest UUID;

-- A delivery of an already processed command records whether it was refused for reusing the
-- key with another payload; a refused one also records what it asked for. The aggregate is
-- the one the delivery named (not necessarily the original's), so `cmdproc inspect` of that
-- aggregate shows the refusal. Plain duplicates, and rows recorded before this migration,
-- have NULLs there and `key_reused = false`.
ALTER TABLE duplicate_deliveries
    ADD COLUMN key_reused     BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN digest         UUID,
    ADD COLUMN aggregate_type TEXT,
    ADD COLUMN aggregate_id   TEXT,
    ADD COLUMN command_type   TEXT;
CREATE INDEX duplicate_deliveries_key_reused
    ON duplicate_deliveries (aggregate_type, aggregate_id, seen_at) WHERE key_reused;
