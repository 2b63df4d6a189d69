-- Router: the usage and cost ledger and the outbox for usage events.
CREATE SCHEMA IF NOT EXISTS router;

CREATE TABLE router.usage_ledger (
    id                bigserial PRIMARY KEY,
    tenant            text        NOT NULL,
    run_id            text        NOT NULL,
    task_id           text        NOT NULL,
    attempt           integer     NOT NULL,
    deployment        text        NOT NULL,
    provider          text        NOT NULL,
    model             text        NOT NULL,
    outcome           text        NOT NULL CHECK (outcome IN ('ok', 'error')),
    -- Set exactly when outcome = 'error'; the values of the `colony-error-class` metadata.
    error_class       text        CHECK (error_class IN ('transient', 'permanent', 'user_fixable',
                                                         'external_rate_limit', 'external_degrading')),
    prompt_tokens     bigint      NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint      NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    -- Millionths of a US dollar: tokens × price per million tokens.
    cost_micros_usd   bigint      NOT NULL DEFAULT 0 CHECK (cost_micros_usd >= 0),
    latency_ms        bigint      NOT NULL CHECK (latency_ms >= 0),
    occurred_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((outcome = 'error') = (error_class IS NOT NULL))
);
CREATE INDEX usage_by_tenant ON router.usage_ledger (tenant, occurred_at);

CREATE TABLE router.outbox (
    id          bigserial PRIMARY KEY,
    msg_id      text        NOT NULL UNIQUE,
    subject     text        NOT NULL,
    payload     bytea       NOT NULL,
    traceparent text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX router_outbox_unsent ON router.outbox (id) WHERE sent_at IS NULL;
