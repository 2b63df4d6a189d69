-- The dispatcher pass and inline dispatch count dispatched-but-unclaimed attempts against
-- `limits.max_unclaimed`; without an index of exactly those rows the planner combines the
-- broader queue indexes and reads the whole queue on every pass.
CREATE INDEX tasks_unclaimed ON orchestrator.tasks (tenant)
    WHERE state = 'queued' AND dispatched_at IS NOT NULL;

-- Queue tables change fast: keep their planner statistics fresh.
ALTER TABLE orchestrator.tasks SET (autovacuum_analyze_scale_factor = 0.02,
                                    autovacuum_vacuum_scale_factor = 0.05);
