-- Memory: conversation sessions and their messages. Only the memory service reads these tables.
CREATE SCHEMA IF NOT EXISTS memory;

CREATE TABLE memory.sessions (
    tenant        text        NOT NULL,
    session_id    text        NOT NULL,
    -- The run that created the session (filled by the first append that names one).
    run_id        text,
    -- Highest `seq` handed out; appends lock this row to assign the next ones.
    last_seq      bigint      NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    message_count bigint      NOT NULL DEFAULT 0 CHECK (message_count >= 0),
    -- Sum of the messages' estimated token counts.
    token_count   bigint      NOT NULL DEFAULT 0 CHECK (token_count >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, session_id)
);

CREATE TABLE memory.messages (
    tenant      text        NOT NULL,
    session_id  text        NOT NULL,
    -- 1, 2, 3, … within a session, without gaps.
    seq         bigint      NOT NULL CHECK (seq >= 1),
    role        text        NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content     text        NOT NULL,
    -- Estimate: characters / 4, rounded up, at least 1.
    token_count integer     NOT NULL CHECK (token_count >= 1),
    run_id      text,
    task_id     text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, session_id, seq),
    FOREIGN KEY (tenant, session_id) REFERENCES memory.sessions (tenant, session_id) ON DELETE CASCADE
);
