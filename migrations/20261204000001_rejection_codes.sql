-- A rejection's machine-readable code (`insufficient_funds`), recorded beside its reason so
-- callers and `cmdproc inspect` can branch on it. Outcomes recorded before have none.
ALTER TABLE processed_commands ADD COLUMN code TEXT;
