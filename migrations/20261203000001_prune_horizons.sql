-- How far back each commands topic's outcomes have been pruned: every pass of a worker's
-- pruning records its horizon here (never moving it back) before deleting, so that
-- `cmdproc replay` can refuse a range whose duplicates could no longer be recognised from
-- their recorded outcomes, whatever dedupe window the replaying operator believes in.
CREATE TABLE prune_horizons (
    topic          TEXT        PRIMARY KEY,
    pruned_before  TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Pruning is per commands topic now: look outcomes up by topic and age, so one topic's
-- short window does not scan another topic's long-kept outcomes. It replaces the index on
-- age alone (nothing else reads by age), so a batch writes no more index entries than before.
DROP INDEX IF EXISTS processed_commands_processed_at;
CREATE INDEX processed_commands_topic_processed_at ON processed_commands (topic, processed_at);
