-- Demo schema that deploy/local/cluster.sh applies on every shard primary, as the
-- user `app` (so `app` owns the tables). Replicas get it by streaming replication.
-- It must stay idempotent: cluster.sh runs it on every `up`.

CREATE TABLE IF NOT EXISTS users (
    id         bigint PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Sharded by user_id: a user's posts live on the same shard as the user.
CREATE TABLE IF NOT EXISTS posts (
    id         bigint NOT NULL,
    user_id    bigint NOT NULL,
    body       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, id)
);
