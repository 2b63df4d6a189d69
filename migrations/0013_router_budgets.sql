-- Router: hard spending budgets per tenant, per run and per task, in micro-USD.
--
-- A call reserves its worst-case cost on every budget that applies before it goes to a
-- provider, and the ledger settles the reservation to the actual cost afterwards. A call is
-- refused when spent + reserved + its reservation would exceed the limit of any one of them.
CREATE TABLE router.budgets (
    scope           text        NOT NULL CHECK (scope IN ('tenant', 'run', 'task')),
    -- The tenant name, the run id or the task id.
    key             text        NOT NULL,
    tenant          text        NOT NULL,
    limit_micros    bigint      NOT NULL CHECK (limit_micros >= 0),
    reserved_micros bigint      NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
    -- May pass the limit: a provider that overruns max_tokens is still charged what it cost.
    spent_micros    bigint      NOT NULL DEFAULT 0 CHECK (spent_micros >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);

-- Reserves `amount` on every budget named by (scopes[i], keys[i]), or on none of them.
--
-- A function so that the router needs one statement and one round trip even for the first call
-- of a run or task, whose budget row has to be created first: rows a statement inserts are
-- invisible to the rest of that statement, so creation and reservation cannot share one.
--
-- Budget rows are locked in (scope, key) order, here and in the ledger's settlement, so two
-- calls sharing budgets never deadlock. Under READ COMMITTED, `FOR UPDATE` waits for a
-- concurrent holder and then returns the row's newest committed version, so the check sees
-- every reservation committed before it; the UPDATE then rewrites that same newest version
-- (which this transaction holds locked), so nothing committed in between is overwritten.
--
-- Returns one row per existing budget with its values before this call and whether the
-- reservation was granted (the same for every row). Budgets that do not exist (a tenant limit
-- removed since the caller looked) are skipped.
CREATE FUNCTION router.budget_reserve(
    scopes text[], keys text[], run_task_limits bigint[], for_tenant text, amount bigint
) RETURNS TABLE (
    o_scope text, o_key text, o_limit bigint, o_reserved bigint, o_spent bigint, o_granted boolean
) LANGUAGE plpgsql AS $$
BEGIN
    -- A run or task budget starts with the first call that names it; the limit that call
    -- gave stays (later calls naming another limit do not change it).
    INSERT INTO router.budgets (scope, key, tenant, limit_micros)
    SELECT w.scope, w.key, for_tenant, w.lim
    FROM unnest(scopes, keys, run_task_limits) AS w(scope, key, lim)
    WHERE w.scope <> 'tenant'
    ORDER BY w.scope, w.key
    ON CONFLICT (scope, key) DO NOTHING;

    RETURN QUERY
    WITH locked AS (
        SELECT b.scope, b.key, b.limit_micros, b.reserved_micros, b.spent_micros
        FROM router.budgets b
        JOIN unnest(scopes, keys) AS w(scope, key) ON b.scope = w.scope AND b.key = w.key
        ORDER BY b.scope, b.key
        FOR UPDATE OF b
    ), verdict AS (
        SELECT coalesce(bool_and(l.spent_micros + l.reserved_micros + amount <= l.limit_micros),
                        true) AS granted
        FROM locked l
    ), reserved AS (
        UPDATE router.budgets b
        SET reserved_micros = b.reserved_micros + amount, updated_at = now()
        FROM locked l, verdict v
        WHERE v.granted AND b.scope = l.scope AND b.key = l.key
        RETURNING b.scope
    )
    SELECT l.scope, l.key, l.limit_micros, l.reserved_micros, l.spent_micros, v.granted
    -- `reserved` runs to completion although nothing reads it (PostgreSQL's rule for
    -- data-modifying WITH).
    FROM locked l, verdict v;
END
$$;
