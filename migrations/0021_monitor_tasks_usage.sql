-- Monitor: its own view of tasks and of model usage, from the events it consumes
-- (services/monitor/README.md, "Tasks" and "Usage"). Only the monitor reads these tables; it
-- never reads the orchestrator's or the router's.

-- The last state of each task the monitor heard of. An event applies only if it comes later in
-- the task's life than the one the row holds: a higher attempt, or the same attempt at a later
-- stage (`stage`: 0 awaiting approval, 1 queued, 2 started, 3 ended: finished or parked), or
-- the same stage at a later event time. Redelivered and reordered events change nothing.
CREATE TABLE monitor.tasks (
    task_id    text        PRIMARY KEY,
    tenant     text        NOT NULL,
    run_id     text        NOT NULL,
    role       text        NOT NULL,
    attempt    bigint      NOT NULL,
    stage      smallint    NOT NULL,
    -- `waiting`: awaiting approval or parked; `finished`: succeeded, failed, cancelled or
    -- dead-lettered. Those rows are kept a while only so that a late older event cannot bring
    -- the task back.
    state      text        NOT NULL CHECK (state IN ('queued', 'running', 'waiting', 'finished')),
    -- The time of the event that set `state` (queued since, running since, …).
    since      timestamptz NOT NULL,
    -- When the row was last written (the monitor's clock): retention counts from here.
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The sweep, the alert rules and the status API count and list the open ones every few
-- seconds; retention deletes by `updated_at`.
CREATE INDEX tasks_open ON monitor.tasks (state, since) WHERE state IN ('queued', 'running');
CREATE INDEX tasks_by_updated ON monitor.tasks (updated_at);

-- Model usage per hour, tenant, run, deployment and model, summed from usage events.
CREATE TABLE monitor.usage (
    hour              timestamptz NOT NULL,
    tenant            text        NOT NULL,
    run_id            text        NOT NULL,
    deployment        text        NOT NULL,
    model             text        NOT NULL,
    calls             bigint      NOT NULL,
    prompt_tokens     bigint      NOT NULL,
    completion_tokens bigint      NOT NULL,
    cost_micros_usd   bigint      NOT NULL,
    first_at          timestamptz NOT NULL,
    last_at           timestamptz NOT NULL,
    -- `hour` first: `since` filters and retention are ranges on it.
    PRIMARY KEY (hour, tenant, run_id, deployment, model)
);
CREATE INDEX usage_by_tenant ON monitor.usage (tenant, hour);

-- Usage events already counted, by a digest of their payload (which carries the call's own
-- time), so a redelivered event is not counted twice. Kept for `usage_dedup_window`.
CREATE TABLE monitor.usage_seen (
    digest  uuid        PRIMARY KEY,
    seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_seen_by_time ON monitor.usage_seen (seen_at);
