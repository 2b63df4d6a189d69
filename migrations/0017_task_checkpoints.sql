-- The last checkpoint of a task's agent loop (a protobuf colony.v1.Checkpoint, opaque to the
-- orchestrator), saved by the worker of the running attempt and handed to the next attempt
-- with its claim. Goes with its task.
CREATE TABLE orchestrator.task_checkpoints (
    task_id    uuid        PRIMARY KEY REFERENCES orchestrator.tasks (id) ON DELETE CASCADE,
    attempt    integer     NOT NULL,
    checkpoint bytea       NOT NULL,
    saved_at   timestamptz NOT NULL DEFAULT now()
);
