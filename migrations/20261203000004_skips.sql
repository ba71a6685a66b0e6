-- An operator's skip is a recorded outcome: the skipped command's (source, id) is kept in
-- processed_commands with outcome 'skipped' and the operator's reason, so a later delivery
-- of it (a replay, a redrive, a client retry) is a duplicate without effect. Dead letters
-- that are not parked can be skipped too.
ALTER TABLE processed_commands DROP CONSTRAINT processed_commands_outcome_check;
ALTER TABLE processed_commands
    ADD CONSTRAINT processed_commands_outcome_check CHECK (outcome IN ('applied', 'rejected', 'skipped'));
ALTER TABLE dead_letters
    ADD COLUMN skipped_at  TIMESTAMPTZ,
    ADD COLUMN skip_reason TEXT;
