-- Orchestrator: runs as DAGs of role tasks — the topology the dial chose, the failure policy,
-- how the plan came about, and dependencies between tasks. Only the orchestrator reads these
-- tables.

ALTER TABLE orchestrator.runs
    -- monolith | hybrid | swarm; NULL for runs created before this migration.
    ADD COLUMN topology            text CHECK (topology IN ('monolith', 'hybrid', 'swarm')),
    ADD COLUMN topology_reason     text,
    -- Whether the caller chose the topology rather than the dial.
    ADD COLUMN topology_overridden boolean NOT NULL DEFAULT false,
    -- What the dial looked at (goal tokens, working set, context window, fill, quality).
    ADD COLUMN dial_inputs         jsonb,
    -- fail_fast: the first dead letter fails the run and cancels what has not started;
    -- continue: independent branches go on, dependents of a failed task are skipped.
    ADD COLUMN failure_policy      text NOT NULL DEFAULT 'fail_fast'
        CHECK (failure_policy IN ('fail_fast', 'continue')),
    -- Where the run's DAG came from: its planner's first answer, a repaired answer, or the
    -- roster's template after the planner ran out of repairs. NULL until a planner answered
    -- (and for runs that never plan).
    ADD COLUMN plan_source         text CHECK (plan_source IN ('planner', 'repaired', 'template')),
    -- Every validation error a planner's answer got, in order.
    ADD COLUMN plan_errors         jsonb NOT NULL DEFAULT '[]';

-- Task states: `pending` (waits for its dependencies; neither dispatched nor claimable) and
-- `skipped` (a dependency failed under the `continue` policy).
ALTER TABLE orchestrator.tasks DROP CONSTRAINT IF EXISTS tasks_state_check;
ALTER TABLE orchestrator.tasks ADD CONSTRAINT tasks_state_check CHECK (state IN (
    'queued', 'running', 'succeeded', 'failed', 'dead_lettered', 'cancelling', 'cancelled',
    'pending', 'skipped'));

-- A planner attempt whose answer was not a valid plan (it is asked again).
ALTER TABLE orchestrator.task_attempts DROP CONSTRAINT IF EXISTS task_attempts_outcome_check;
ALTER TABLE orchestrator.task_attempts ADD CONSTRAINT task_attempts_outcome_check CHECK (outcome IN (
    'succeeded', 'failed', 'lease_expired', 'cancelled', 'invalid_plan'));

-- The task's id within its plan or template ("research"), which dependents' context names.
ALTER TABLE orchestrator.tasks ADD COLUMN plan_key text;

-- `task_id` runs only once every `depends_on` succeeded. Both belong to the same run.
CREATE TABLE orchestrator.task_dependencies (
    task_id    uuid NOT NULL REFERENCES orchestrator.tasks (id) ON DELETE CASCADE,
    depends_on uuid NOT NULL REFERENCES orchestrator.tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, depends_on),
    CHECK (task_id <> depends_on)
);
CREATE INDEX task_dependencies_dependents ON orchestrator.task_dependencies (depends_on);
