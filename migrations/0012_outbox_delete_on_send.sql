-- Outbox rows are now deleted once JetStream has acknowledged them, instead of being marked
-- sent and kept for an hour: marking wrote a new version of each row and of its index entries,
-- which under load cost PostgreSQL more than the rest of a task's work. Every row left is
-- waiting to be sent, so the partial index of unsent rows goes with the column (the primary
-- key orders the relay's scan). Relays of earlier versions must be stopped before this runs.
DELETE FROM orchestrator.outbox WHERE sent_at IS NOT NULL;
ALTER TABLE orchestrator.outbox DROP COLUMN sent_at;
DELETE FROM router.outbox WHERE sent_at IS NOT NULL;
ALTER TABLE router.outbox DROP COLUMN sent_at;
