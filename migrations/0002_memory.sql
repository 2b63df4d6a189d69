-- Memory: conversation sessions and their messages. Only the memory service reads these tables.
CREATE SCHEMA IF NOT EXISTS memory;

CREATE TABLE memory.sessions (
    tenant        text        NOT NULL,
    session_id    text        NOT NULL,
    run_id        text,
    message_count bigint      NOT NULL DEFAULT 0,
    token_count   bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, session_id)
);

CREATE TABLE memory.messages (
    tenant      text        NOT NULL,
    session_id  text        NOT NULL,
    seq         bigint      NOT NULL,
    role        text        NOT NULL,
    content     text        NOT NULL,
    token_count integer     NOT NULL,
    task_id     text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, session_id, seq),
    FOREIGN KEY (tenant, session_id) REFERENCES memory.sessions (tenant, session_id) ON DELETE CASCADE
);
