-- Redriving dead letters and releasing parked aggregates, with the history kept.
ALTER TABLE dead_letters ADD COLUMN redriven_at TIMESTAMPTZ;
ALTER TABLE parked_commands
    ADD COLUMN redriven_at TIMESTAMPTZ,
    ADD COLUMN skipped_at  TIMESTAMPTZ,
    ADD COLUMN skip_reason TEXT;
