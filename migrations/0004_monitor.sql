-- Monitor: the worker registry, kept from heartbeats.
CREATE SCHEMA IF NOT EXISTS monitor;

CREATE TABLE monitor.workers (
    worker_id    text PRIMARY KEY,
    roles        text[]      NOT NULL,
    slots_total  integer     NOT NULL,
    slots_busy   integer     NOT NULL,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL,
    last_seen_at timestamptz NOT NULL
);
