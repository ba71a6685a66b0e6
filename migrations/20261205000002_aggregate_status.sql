-- Where an aggregate stands, as its type's `Aggregate::status` says (a saga's step), written
-- with its state; counted in the gauge cmdproc_aggregates{type, status}. NULL for types
-- without statuses and for rows written before this migration.
ALTER TABLE aggregates ADD COLUMN status TEXT;
CREATE INDEX aggregates_status ON aggregates (aggregate_type, status) WHERE status IS NOT NULL;
