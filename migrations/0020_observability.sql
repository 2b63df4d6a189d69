-- Observability (issue 8).

-- The W3C traceparent of the request that created the run: dispatches carry it, so one trace
-- follows the run through the worker, the router and memory.
ALTER TABLE orchestrator.runs ADD COLUMN traceparent text;

-- The orchestrator's work gauges (tasks by tenant, role and unfinished state; running runs by
-- tenant) are read every few seconds: these cover unfinished rows only.
CREATE INDEX tasks_active ON orchestrator.tasks (tenant, role, state, ready_at)
    WHERE state IN ('queued', 'pending', 'running', 'cancelling', 'awaiting_approval', 'parked');
CREATE INDEX runs_running ON orchestrator.runs (tenant) WHERE status = 'running';
