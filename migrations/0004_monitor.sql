-- Monitor: the worker registry, kept from heartbeats. Only the monitor reads this table.
CREATE SCHEMA IF NOT EXISTS monitor;

CREATE TABLE monitor.workers (
    worker_id    text PRIMARY KEY,
    roles        text[]      NOT NULL,
    slots_total  integer     NOT NULL CHECK (slots_total >= 0),
    slots_busy   integer     NOT NULL CHECK (slots_busy >= 0),
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL,
    -- Send time of the newest heartbeat (never later than its arrival); a worker is alive
    -- while this is within `worker_stale_after`.
    last_seen_at timestamptz NOT NULL
);
CREATE INDEX workers_by_last_seen ON monitor.workers (last_seen_at);
