-- Orchestrator: cron schedules that create runs, and the record of every firing. Only the
-- orchestrator reads these tables.

CREATE TABLE orchestrator.schedules (
    id            uuid PRIMARY KEY,
    tenant        text        NOT NULL,
    name          text        NOT NULL,
    -- Five cron fields, read as wall-clock time in `timezone` (an IANA name).
    cron          text        NOT NULL,
    timezone      text        NOT NULL,
    goal          text        NOT NULL,
    -- What to do with firings missed while no orchestrator was firing (outage, lost leader).
    missed        text        NOT NULL CHECK (missed IN ('skip', 'catch_up')),
    enabled       boolean     NOT NULL DEFAULT true,
    -- The next fire time, in UTC; NULL while disabled. The firing loop moves it forward in the
    -- same transaction that records the firing and creates the run.
    next_fire_at  timestamptz,
    -- The last firing: its scheduled time, when it happened, how, and the run it created.
    last_fire_at  timestamptz,
    last_fired_at timestamptz,
    last_kind     text,
    last_run_id   uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant, name),
    CHECK (enabled OR next_fire_at IS NULL)
);
CREATE INDEX schedules_due ON orchestrator.schedules (next_fire_at) WHERE enabled;

-- One row per firing. The primary key makes a firing idempotent: whoever inserts
-- (schedule_id, fire_at) first creates the run, in the same transaction; anyone else (a second
-- leader, a retried tick) conflicts and creates nothing.
CREATE TABLE orchestrator.schedule_firings (
    schedule_id uuid        NOT NULL REFERENCES orchestrator.schedules (id) ON DELETE CASCADE,
    fire_at     timestamptz NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('scheduled', 'catch_up', 'manual')),
    -- Firings this one stands for that were not run on their own (missed or coalesced).
    missed      integer     NOT NULL DEFAULT 0,
    -- The run it created: set in the transaction that inserts the row (the row is inserted
    -- first, to claim the firing before any run exists).
    run_id      uuid        REFERENCES orchestrator.runs (id) ON DELETE SET NULL,
    fired_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_id, fire_at)
);
CREATE INDEX schedule_firings_by_run ON orchestrator.schedule_firings (run_id);
