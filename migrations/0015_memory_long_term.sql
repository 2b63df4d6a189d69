-- Memory: long-term semantic memories, session summaries, strategies and the replay log.
--
-- PostgreSQL is the source of truth; each memory replica keeps its own nearest-neighbour index
-- in process, rebuilt from `memory.memories` at start and kept current through
-- `colony.v1.event.memory.changed` events plus a periodic pass over recently changed rows.

-- Bumped on every change of a memory, so a replica applies a row only when it is newer than
-- what its index holds.
CREATE SEQUENCE memory.memory_revision;

CREATE TABLE memory.memories (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          text        NOT NULL,
    scope_kind      text        NOT NULL CHECK (scope_kind IN ('tenant', 'role', 'run', 'session')),
    -- '' for the tenant scope; the role, run or session id otherwise.
    scope_id        text        NOT NULL,
    content         text        NOT NULL,
    -- Little-endian f32 values, L2-normalised.
    embedding       bytea       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    importance      real        NOT NULL DEFAULT 0.5 CHECK (importance >= 0 AND importance <= 1),
    -- Writes this memory stands for: near-duplicates are merged into it.
    duplicate_count integer     NOT NULL DEFAULT 1 CHECK (duplicate_count >= 1),
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    expires_at      timestamptz,
    -- A tombstone: the row no longer answers anything and is purged by the sweeper after the
    -- tombstone retention, long enough for every replica to have seen it.
    deleted_at      timestamptz,
    revision        bigint      NOT NULL DEFAULT nextval('memory.memory_revision'),
    -- The database's time of the last change (updated_at follows the service's clock): replicas
    -- read rows changed since their last pass by it.
    changed_at      timestamptz NOT NULL DEFAULT now()
);

-- The exact same text in the same scope is one memory, even when two replicas race. The hash
-- leads: no query looks memories up by tenant alone, and none should pick this index to.
CREATE UNIQUE INDEX memories_exact_text ON memory.memories
    (md5(content), tenant, scope_kind, scope_id) WHERE deleted_at IS NULL;
CREATE INDEX memories_changed ON memory.memories (changed_at);
CREATE INDEX memories_expiry ON memory.memories (expires_at)
    WHERE deleted_at IS NULL AND expires_at IS NOT NULL;
CREATE INDEX memories_tombstones ON memory.memories (deleted_at) WHERE deleted_at IS NOT NULL;

-- Summaries of a session's older messages. The messages themselves stay in memory.messages;
-- the summary covers first_seq..last_seq of them.
CREATE TABLE memory.session_summaries (
    tenant      text        NOT NULL,
    session_id  text        NOT NULL,
    first_seq   bigint      NOT NULL CHECK (first_seq >= 1),
    last_seq    bigint      NOT NULL CHECK (last_seq >= first_seq),
    content     text        NOT NULL,
    token_count integer     NOT NULL CHECK (token_count >= 1),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, session_id, first_seq),
    FOREIGN KEY (tenant, session_id) REFERENCES memory.sessions (tenant, session_id) ON DELETE CASCADE
);

ALTER TABLE memory.sessions
    -- Messages up to here are covered by summaries.
    ADD COLUMN summarized_through_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN expires_at timestamptz;
CREATE INDEX sessions_updated ON memory.sessions (updated_at);

CREATE TABLE memory.strategies (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant          text        NOT NULL,
    role            text        NOT NULL,
    title           text        NOT NULL,
    when_to_use     text        NOT NULL,
    strategy        text        NOT NULL,
    from_success    boolean     NOT NULL,
    -- Of title + when_to_use: what a task is matched against.
    embedding       bytea       NOT NULL,
    wins            integer     NOT NULL DEFAULT 0 CHECK (wins >= 0),
    losses          integer     NOT NULL DEFAULT 0 CHECK (losses >= 0),
    uses            integer     NOT NULL DEFAULT 0 CHECK (uses >= 0),
    duplicate_count integer     NOT NULL DEFAULT 1 CHECK (duplicate_count >= 1),
    status          text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'pruned')),
    pruned_reason   text,
    source_run_id   text,
    source_task_id  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX strategies_role ON memory.strategies (tenant, role) WHERE status = 'active';

-- Every change of a strategy: created, merged, suggested, win, loss, pruned.
CREATE TABLE memory.strategy_audit (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    strategy_id bigint      NOT NULL REFERENCES memory.strategies (id) ON DELETE CASCADE,
    tenant      text        NOT NULL,
    event       text        NOT NULL CHECK (event IN ('created', 'merged', 'suggested', 'win', 'loss', 'pruned')),
    detail      text        NOT NULL DEFAULT '',
    run_id      text,
    task_id     text,
    occurred_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX strategy_audit_strategy ON memory.strategy_audit (strategy_id, id);

-- The replay log: one row per task attempt, with its outcome once known.
CREATE TABLE memory.trajectories (
    tenant      text        NOT NULL,
    run_id      text        NOT NULL,
    task_id     text        NOT NULL,
    attempt     integer     NOT NULL,
    role        text        NOT NULL DEFAULT '',
    -- The last lifecycle event's kind: started, succeeded, failed, cancelled, …
    outcome     text        NOT NULL DEFAULT 'started',
    error_class text        NOT NULL DEFAULT '',
    reason      text        NOT NULL DEFAULT '',
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost_micros_usd   bigint NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, run_id, task_id, attempt)
);
CREATE INDEX trajectories_updated ON memory.trajectories (updated_at);

CREATE TABLE memory.trajectory_steps (
    tenant      text        NOT NULL,
    run_id      text        NOT NULL,
    task_id     text        NOT NULL,
    attempt     integer     NOT NULL,
    step        integer     NOT NULL,
    -- The step's chat message as JSON: role, content, tool_calls, tool_call_id.
    message     jsonb       NOT NULL,
    occurred_at timestamptz NOT NULL,
    PRIMARY KEY (tenant, run_id, task_id, attempt, step),
    FOREIGN KEY (tenant, run_id, task_id, attempt)
        REFERENCES memory.trajectories (tenant, run_id, task_id, attempt) ON DELETE CASCADE
);
