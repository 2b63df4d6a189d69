-- Monitor: when the sweep logged a task as stale (running longer than stale_task_after), so it
-- logs each stale attempt once. A later event of the task (a new stage or attempt) clears it.
ALTER TABLE monitor.tasks ADD COLUMN stale_reported_at timestamptz;
