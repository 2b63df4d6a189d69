-- Router: each deployment's requests-per-minute and tokens-per-minute buckets, shared by every
-- router replica so that the configured limits hold for the fleet, not per replica.
--
-- Replicas do not take from these rows per request: each leases a slice (several requests'
-- worth) in one statement, hands it out locally and gives back what it left unused, so a busy
-- deployment's row is written a few times a second per replica at most.
CREATE TABLE router.rate_buckets (
    deployment text        NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('requests', 'tokens')),
    -- The per-minute limit: the bucket holds at most a minute's worth.
    capacity   float8      NOT NULL CHECK (capacity > 0),
    per_second float8      NOT NULL CHECK (per_second > 0),
    -- As of `updated_at`; refilled by elapsed database time whenever the row is touched.
    level      float8      NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (deployment, kind)
);
