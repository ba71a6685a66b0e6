-- How many times each partition was taken, now that epochs follow the clock: a new epoch
-- is at least the current time in microseconds, so epochs handed out after a database
-- restore are still larger than any handed out before it (a stale worker's remembered
-- epoch can never come back into use).
ALTER TABLE partitions ADD COLUMN acquisitions BIGINT NOT NULL DEFAULT 0;
