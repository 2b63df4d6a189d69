-- Orchestrator flow control: priorities, per-tenant fairness and in-flight caps, bounded
-- queues. Only the orchestrator reads these tables.

-- A run's priority (-10..10, higher first), copied onto its tasks so the dispatcher orders
-- within a tenant without a join.
ALTER TABLE orchestrator.runs
    ADD COLUMN priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -10 AND 10);
ALTER TABLE orchestrator.tasks
    ADD COLUMN priority smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN -10 AND 10);

-- The dispatcher pass: ready attempts waiting for dispatch, per tenant in priority order.
CREATE INDEX tasks_dispatch_order ON orchestrator.tasks (tenant, priority DESC, ready_at)
    WHERE state = 'queued' AND dispatched_at IS NULL;
-- A tenant's in-flight attempts (dispatched and not yet finished).
CREATE INDEX tasks_in_flight ON orchestrator.tasks (tenant)
    WHERE state IN ('queued', 'running', 'cancelling') AND dispatched_at IS NOT NULL;
-- A tenant's queue depth (bounded by `limits.max_queued_per_tenant`).
CREATE INDEX tasks_queued_by_tenant ON orchestrator.tasks (tenant)
    WHERE state IN ('queued', 'pending');

-- The limits every replica applies when it dispatches inline (a new run, a dependent whose
-- dependencies succeeded): written from config at start. No row: the defaults.
CREATE TABLE orchestrator.flow_limits (
    singleton                boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_in_flight_per_tenant integer NOT NULL,
    max_unclaimed            integer NOT NULL,
    changed_at               timestamptz NOT NULL DEFAULT now()
);

-- Every task takes its run's priority when it is inserted (planned, planner-made or spawned).
CREATE FUNCTION orchestrator.task_priority_from_run() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.priority := COALESCE(
        (SELECT priority FROM orchestrator.runs WHERE id = NEW.run_id), NEW.priority);
    RETURN NEW;
END
$$;
CREATE TRIGGER tasks_priority_from_run BEFORE INSERT ON orchestrator.tasks
    FOR EACH ROW EXECUTE FUNCTION orchestrator.task_priority_from_run();
