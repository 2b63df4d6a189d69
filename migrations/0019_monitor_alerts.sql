-- Monitor: alerts from the rules in its configuration (services/monitor/README.md, "Alerts").
-- At most one firing alert per rule (the partial unique index is the de-duplication, also
-- between replicas); resolved alerts stay as history.
CREATE TABLE monitor.alerts (
    id          bigserial PRIMARY KEY,
    rule        text             NOT NULL,
    state       text             NOT NULL CHECK (state IN ('firing', 'resolved')),
    threshold   double precision NOT NULL,
    -- The rule's value when it fired, and the latest one while it fires.
    fired_value double precision NOT NULL,
    last_value  double precision NOT NULL,
    summary     text             NOT NULL,
    fired_at    timestamptz      NOT NULL DEFAULT now(),
    resolved_at timestamptz
);
CREATE UNIQUE INDEX alerts_one_firing_per_rule ON monitor.alerts (rule) WHERE state = 'firing';
CREATE INDEX alerts_by_rule ON monitor.alerts (rule, fired_at DESC);

-- Each notification of an alert (its firing, its resolution) to each webhook.
CREATE TABLE monitor.alert_deliveries (
    alert_id     bigint      NOT NULL REFERENCES monitor.alerts (id) ON DELETE CASCADE,
    event        text        NOT NULL CHECK (event IN ('firing', 'resolved')),
    webhook      text        NOT NULL,
    attempts     integer     NOT NULL DEFAULT 0,
    delivered_at timestamptz,
    last_error   text,
    PRIMARY KEY (alert_id, event, webhook)
);
