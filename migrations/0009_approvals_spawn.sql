-- Orchestrator: the human approval gate and tasks spawning child tasks. Only the orchestrator
-- reads these tables.

-- Task states: `awaiting_approval` (would be ready, but a human must approve it first; neither
-- dispatched nor claimable) and `parked` (spawned children and waits for them without a lease
-- or a worker slot; resumed with a new attempt once they all finished).
ALTER TABLE orchestrator.tasks DROP CONSTRAINT IF EXISTS tasks_state_check;
ALTER TABLE orchestrator.tasks ADD CONSTRAINT tasks_state_check CHECK (state IN (
    'queued', 'running', 'succeeded', 'failed', 'dead_lettered', 'cancelling', 'cancelled',
    'pending', 'skipped', 'awaiting_approval', 'parked'));

-- An attempt that ended by parking its task (the worker stops; the task resumes later).
ALTER TABLE orchestrator.task_attempts DROP CONSTRAINT IF EXISTS task_attempts_outcome_check;
ALTER TABLE orchestrator.task_attempts ADD CONSTRAINT task_attempts_outcome_check CHECK (outcome IN (
    'succeeded', 'failed', 'lease_expired', 'cancelled', 'invalid_plan', 'parked'));

ALTER TABLE orchestrator.tasks
    -- Why the task needs approval before it runs (role flag, estimated spend); NULL: it does not.
    ADD COLUMN approval_reason      text,
    -- When it waited for approval since, and when it was approved.
    ADD COLUMN awaiting_approval_at timestamptz,
    ADD COLUMN approved_at          timestamptz,
    -- The task that spawned this one (NULL for a run's planned tasks), and how deep in a
    -- chain of spawns it is (0 for planned tasks, a child of a planned task is 1, …).
    ADD COLUMN parent_id            uuid REFERENCES orchestrator.tasks (id) ON DELETE CASCADE,
    ADD COLUMN spawn_depth          integer NOT NULL DEFAULT 0 CHECK (spawn_depth >= 0);

CREATE INDEX tasks_children ON orchestrator.tasks (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX tasks_awaiting_approval ON orchestrator.tasks (tenant, awaiting_approval_at)
    WHERE state = 'awaiting_approval';
