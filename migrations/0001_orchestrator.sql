-- Orchestrator: runs, tasks, attempts and the outbox. Only the orchestrator reads these tables.
CREATE SCHEMA IF NOT EXISTS orchestrator;

CREATE TABLE orchestrator.runs (
    id                uuid PRIMARY KEY,
    tenant            text        NOT NULL,
    goal              text        NOT NULL,
    status            text        NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    output            text,
    failed_task_id    uuid,
    failure_reason    text,
    error_class       text,
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    cost_micros_usd   bigint      NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);
CREATE INDEX runs_by_tenant ON orchestrator.runs (tenant, created_at DESC);

CREATE TABLE orchestrator.tasks (
    id                uuid PRIMARY KEY,
    run_id            uuid        NOT NULL REFERENCES orchestrator.runs (id) ON DELETE CASCADE,
    tenant            text        NOT NULL,
    role              text        NOT NULL,
    instructions      text        NOT NULL,
    state             text        NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    -- Fencing token: every claim, heartbeat and report names the attempt it belongs to.
    attempt           integer     NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    lease_owner       text,
    lease_expires_at  timestamptz,
    -- When the current attempt became claimable; dispatch latency is measured from here.
    ready_at          timestamptz NOT NULL DEFAULT now(),
    -- Last dispatch of the current attempt, and how many were sent: an attempt that stays
    -- unclaimed (its message lost or out of deliveries) is dispatched again.
    dispatched_at     timestamptz NOT NULL DEFAULT now(),
    dispatches        integer     NOT NULL DEFAULT 1,
    started_at        timestamptz,
    finished_at       timestamptz,
    output            text,
    error_class       text,
    failure_reason    text,
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    cost_micros_usd   bigint      NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tasks_by_run ON orchestrator.tasks (run_id);
CREATE INDEX tasks_running_leases ON orchestrator.tasks (lease_expires_at) WHERE state = 'running';
CREATE INDEX tasks_queued_dispatches ON orchestrator.tasks (dispatched_at) WHERE state = 'queued';

-- One row per claimed attempt: who ran it and how it ended.
CREATE TABLE orchestrator.task_attempts (
    task_id     uuid        NOT NULL REFERENCES orchestrator.tasks (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    worker_id   text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text CHECK (outcome IN ('succeeded', 'failed', 'lease_expired')),
    PRIMARY KEY (task_id, attempt)
);

-- Every report received from a worker, accepted or not, for audit and for tests.
CREATE TABLE orchestrator.task_reports (
    id          bigserial PRIMARY KEY,
    task_id     uuid        NOT NULL,
    attempt     integer     NOT NULL,
    worker_id   text        NOT NULL,
    outcome     text        NOT NULL,
    accepted    boolean     NOT NULL,
    reason      text,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX task_reports_by_task ON orchestrator.task_reports (task_id);

CREATE TABLE orchestrator.outbox (
    id          bigserial PRIMARY KEY,
    msg_id      text        NOT NULL UNIQUE,
    subject     text        NOT NULL,
    payload     bytea       NOT NULL,
    traceparent text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX outbox_unsent ON orchestrator.outbox (id) WHERE sent_at IS NULL;
