-- A run's cost budget, enforced by the router: every model call of the run's tasks names it,
-- and the router refuses a call whose reservation would pass it. NULL: no run budget.
ALTER TABLE orchestrator.runs ADD COLUMN budget_micros_usd bigint
    CHECK (budget_micros_usd IS NULL OR budget_micros_usd >= 0);
