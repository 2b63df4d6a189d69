-- The run-creation token bucket per tenant, shared by every orchestrator replica. Replicas
-- take tokens in small chunks (see flow.rs), so this row is written a few times a second
-- per busy tenant, not once per run.
CREATE TABLE orchestrator.run_tokens (
    tenant text        PRIMARY KEY,
    tokens float8      NOT NULL,
    at     timestamptz NOT NULL
);
