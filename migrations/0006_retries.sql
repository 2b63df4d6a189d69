-- Orchestrator: retries with backoff per error class, dead letters, cancellation and
-- maintenance mode. Only the orchestrator reads these tables.

-- Task states: `dead_lettered` (out of attempts or failed with a final class; parked until
-- re-queued by request), `cancelling` (its run was cancelled while a worker ran it; the worker
-- learns at its next heartbeat) and `cancelled`. `failed` stays for rows written before this
-- migration.
ALTER TABLE orchestrator.tasks DROP CONSTRAINT IF EXISTS tasks_state_check;
ALTER TABLE orchestrator.tasks ADD CONSTRAINT tasks_state_check CHECK (state IN (
    'queued', 'running', 'succeeded', 'failed', 'dead_lettered', 'cancelling', 'cancelled'));

-- Run status `cancelling`: cancelled, but a worker may still be running one of its tasks.
ALTER TABLE orchestrator.runs DROP CONSTRAINT IF EXISTS runs_status_check;
ALTER TABLE orchestrator.runs ADD CONSTRAINT runs_status_check CHECK (status IN (
    'running', 'succeeded', 'failed', 'cancelling', 'cancelled'));

ALTER TABLE orchestrator.task_attempts DROP CONSTRAINT IF EXISTS task_attempts_outcome_check;
ALTER TABLE orchestrator.task_attempts ADD CONSTRAINT task_attempts_outcome_check CHECK (outcome IN (
    'succeeded', 'failed', 'lease_expired', 'cancelled'));

ALTER TABLE orchestrator.tasks
    -- The current attempt is neither dispatched nor claimable before this (retry backoff).
    ADD COLUMN not_before       timestamptz,
    -- First attempt of the current attempt budget: a re-queued dead letter starts a new one,
    -- while `attempt` (the fencing token) keeps growing.
    ADD COLUMN budget_start     integer     NOT NULL DEFAULT 1,
    ADD COLUMN dead_lettered_at timestamptz,
    -- NULL: the current attempt waits for the scheduler (backoff, maintenance, resume).
    ALTER COLUMN dispatched_at DROP NOT NULL;

-- Run lifecycle events carry this in their msg id once a run was re-opened by a re-queue, so
-- a second `failed` is not taken for a duplicate of the first.
ALTER TABLE orchestrator.runs ADD COLUMN revision integer NOT NULL DEFAULT 1;

CREATE INDEX tasks_awaiting_dispatch ON orchestrator.tasks (not_before)
    WHERE state = 'queued' AND dispatched_at IS NULL;
CREATE INDEX tasks_dead_letters ON orchestrator.tasks (tenant, dead_lettered_at DESC)
    WHERE state = 'dead_lettered';
-- The reaper looks at running and cancelling tasks' leases.
CREATE INDEX tasks_expiring_leases ON orchestrator.tasks (lease_expires_at)
    WHERE state IN ('running', 'cancelling');

-- Maintenance mode, one row shared by every replica: while paused nothing is dispatched and
-- claims are refused; in-flight work finishes.
CREATE TABLE orchestrator.maintenance (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    paused     boolean     NOT NULL DEFAULT false,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO orchestrator.maintenance (singleton, paused) VALUES (true, false);
