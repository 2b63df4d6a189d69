-- Judges' verdicts per model tier: the measured side of the capability profile's quality
-- (see services/orchestrator/README.md, "Measured quality"). One row per tier; the counts only
-- grow, under a row lock, so every replica adds to the same totals.
CREATE TABLE orchestrator.model_quality (
    tier           text PRIMARY KEY,
    -- Answers judged (each validated report once).
    judged         bigint NOT NULL DEFAULT 0,
    -- Of those, accepted without a rejection.
    accepted_first bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
