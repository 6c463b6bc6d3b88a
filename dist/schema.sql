-- The part of the Djinn database that djinn-worker reads and writes.
--
-- Table and column names and types match the Djinn server's schema, so the
-- worker runs unchanged against a database the server created (after
-- ALTER TYPE driver_type ADD VALUE 'os'). This file creates only the tables
-- the worker touches; references to server-only tables (keys, variables,
-- cron) are kept as plain nullable columns.
--
-- Load into an empty database:  psql -d djinn -f dist/schema.sql

CREATE TYPE visibility   AS ENUM ('private', 'internal', 'public');
CREATE TYPE status       AS ENUM ('queued', 'running', 'passed', 'passed_with_failures',
                                  'failed', 'killed', 'timed_out');
CREATE TYPE driver_type  AS ENUM ('ssh', 'qemu', 'docker', 'os');
CREATE TYPE trigger_type AS ENUM ('manual', 'push', 'pull', 'schedule');

CREATE TABLE users (
    id         SERIAL    PRIMARY KEY,
    email      VARCHAR   NOT NULL UNIQUE,
    username   VARCHAR   NOT NULL UNIQUE,
    password   BYTEA     NOT NULL,
    verified   BOOLEAN   NOT NULL DEFAULT FALSE,
    cleanup    BOOLEAN   NOT NULL DEFAULT TRUE,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP NOT NULL DEFAULT NOW(),
    deleted_at TIMESTAMP NULL
);

CREATE TABLE namespaces (
    id          SERIAL     PRIMARY KEY,
    user_id     INT        NOT NULL REFERENCES users (id),
    root_id     INT        NULL,
    parent_id   INT        NULL,
    name        VARCHAR    NOT NULL,
    path        VARCHAR    NOT NULL,
    description VARCHAR    NULL,
    level       INT        NOT NULL,
    visibility  visibility DEFAULT 'private',
    created_at  TIMESTAMP  NOT NULL DEFAULT NOW()
);

CREATE TABLE namespace_collaborators (
    id           SERIAL    PRIMARY KEY,
    namespace_id INT       NOT NULL REFERENCES namespaces (id) ON DELETE CASCADE,
    user_id      INT       NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at   TIMESTAMP NOT NULL DEFAULT NOW()
);

-- Custom images users upload; the qemu driver looks a build's image up here.
CREATE TABLE images (
    id           SERIAL      PRIMARY KEY,
    user_id      INT         NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    author_id    INT         NOT NULL REFERENCES users (id),
    namespace_id INT         NULL REFERENCES namespaces (id) ON DELETE SET NULL,
    driver       driver_type NOT NULL,
    hash         VARCHAR     NOT NULL UNIQUE,
    name         VARCHAR     NOT NULL,
    created_at   TIMESTAMP   NOT NULL DEFAULT NOW()
);

-- Files users upload for placing into builds; stored under objects.path.
CREATE TABLE objects (
    id           SERIAL    PRIMARY KEY,
    user_id      INT       NOT NULL REFERENCES users (id),
    author_id    INT       NOT NULL REFERENCES users (id),
    namespace_id INT       NULL REFERENCES namespaces (id) ON DELETE SET NULL,
    hash         VARCHAR   NOT NULL UNIQUE,
    name         VARCHAR   NOT NULL,
    type         VARCHAR   NOT NULL,
    size         INT       NOT NULL,
    md5          BYTEA     NOT NULL,
    sha256       BYTEA     NOT NULL,
    created_at   TIMESTAMP NOT NULL DEFAULT NOW(),
    deleted_at   TIMESTAMP NULL
);

-- One row per build. The worker moves status from queued to running to a
-- final status and writes the whole log to output.
CREATE TABLE builds (
    id           SERIAL    PRIMARY KEY,
    user_id      INT       NOT NULL REFERENCES users (id),
    namespace_id INT       NULL REFERENCES namespaces (id) ON DELETE SET NULL,
    number       INT       NOT NULL,
    manifest     TEXT      NOT NULL,
    status       status    DEFAULT 'queued',
    output       TEXT      NULL,
    secret       TEXT      NULL,
    created_at   TIMESTAMP NOT NULL DEFAULT NOW(),
    started_at   TIMESTAMP NULL,
    finished_at  TIMESTAMP NULL
);

-- Stages run in (created_at, id) order.
-- Tags of a build; the worker adds "orphaned" when it runs a build again
-- whose worker was lost.
CREATE TABLE build_tags (
    id         SERIAL    PRIMARY KEY,
    user_id    INT       NOT NULL REFERENCES users (id),
    build_id   INT       NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    name       VARCHAR   NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT NOW()
);

CREATE TABLE build_stages (
    id          SERIAL    PRIMARY KEY,
    build_id    INT       NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    name        VARCHAR   NOT NULL,
    can_fail    BOOLEAN   NOT NULL,
    status      status    DEFAULT 'queued',
    created_at  TIMESTAMP DEFAULT NOW(),
    started_at  TIMESTAMP NULL,
    finished_at TIMESTAMP NULL
);

-- Jobs run in (created_at, id) order; commands are newline-joined.
CREATE TABLE build_jobs (
    id          SERIAL    PRIMARY KEY,
    build_id    INT       NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    stage_id    INT       NOT NULL REFERENCES build_stages (id) ON DELETE CASCADE,
    name        VARCHAR   NOT NULL,
    commands    VARCHAR   NOT NULL,
    output      TEXT      NULL,
    status      status    DEFAULT 'queued',
    created_at  TIMESTAMP DEFAULT NOW(),
    started_at  TIMESTAMP NULL,
    finished_at TIMESTAMP NULL
);

-- Objects to place: source is the object's name, name the destination.
CREATE TABLE build_objects (
    id         SERIAL    PRIMARY KEY,
    build_id   INT       NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    object_id  INT       NULL REFERENCES objects (id) ON DELETE SET NULL,
    source     VARCHAR   NOT NULL,
    name       VARCHAR   NOT NULL,
    placed     BOOLEAN   NOT NULL DEFAULT FALSE,
    created_at TIMESTAMP NOT NULL DEFAULT NOW()
);

-- Artifacts to collect after a job; size and digests are filled on collection.
CREATE TABLE build_artifacts (
    id         SERIAL    PRIMARY KEY,
    user_id    INT       NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    build_id   INT       NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    job_id     INT       NOT NULL REFERENCES build_jobs (id),
    hash       VARCHAR   NOT NULL UNIQUE,
    source     VARCHAR   NOT NULL,
    name       VARCHAR   NOT NULL,
    size       INT       NULL,
    md5        BYTEA     NULL,
    sha256     BYTEA     NULL,
    created_at TIMESTAMP NOT NULL DEFAULT NOW(),
    deleted_at TIMESTAMP NULL DEFAULT NULL
);

CREATE TABLE build_variables (
    id          SERIAL  PRIMARY KEY,
    build_id    INT     NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    variable_id INT     NULL,
    key         VARCHAR NOT NULL,
    value       VARCHAR NOT NULL,
    -- Later Djinn schemas: a masked value is base64(nonce || AES-GCM
    -- ciphertext) under the crypto key, and is never shown in any output.
    masked      BOOLEAN DEFAULT FALSE
);

-- config holds the manifest's driver block as JSON ({"type": "docker", ...}).
CREATE TABLE build_drivers (
    id       SERIAL      PRIMARY KEY,
    build_id INT         NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    type     driver_type NOT NULL,
    config   JSON        NOT NULL
);

-- A user's account on a code host. access_token is the OAuth token, AES-GCM
-- ciphertext under the crypto key: the worker uses it to set commit statuses.
CREATE TABLE providers (
    id               SERIAL    PRIMARY KEY,
    user_id          INT       NOT NULL REFERENCES users (id),
    provider_user_id INT       NULL,
    name             VARCHAR   NOT NULL,
    access_token     BYTEA     NULL,
    refresh_token    BYTEA     NULL,
    connected        BOOLEAN   NOT NULL DEFAULT FALSE,
    main_account     BOOLEAN   NOT NULL DEFAULT FALSE,
    expires_at       TIMESTAMP NULL
);

-- A repository on a code host: name is owner/repo (GitHub's path),
-- repo_id the host's own id (GitLab's project id).
CREATE TABLE provider_repos (
    id            SERIAL  PRIMARY KEY,
    user_id       INT     NOT NULL REFERENCES users (id),
    provider_id   INT     NOT NULL REFERENCES providers (id),
    hook_id       INT     NULL,
    repo_id       INT     NOT NULL,
    provider_name VARCHAR NOT NULL,
    enabled       BOOLEAN NOT NULL DEFAULT TRUE,
    name          VARCHAR NULL,
    href          VARCHAR NULL
);

CREATE TABLE build_triggers (
    id          SERIAL       PRIMARY KEY,
    build_id    INT          NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    provider_id INT          NULL REFERENCES providers (id) ON DELETE SET NULL,
    repo_id     INT          NULL REFERENCES provider_repos (id) ON DELETE SET NULL,
    type        trigger_type NOT NULL,
    comment     TEXT         NOT NULL,
    data        JSON         NOT NULL,
    created_at  TIMESTAMP    NOT NULL DEFAULT NOW()
);

-- SSH keys to place: key is AES-GCM ciphertext under crypto.block.
CREATE TABLE build_keys (
    id       SERIAL  PRIMARY KEY,
    build_id INT     NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    key_id   INT     NULL,
    name     VARCHAR NOT NULL,
    key      BYTEA   NOT NULL,
    config   TEXT    NOT NULL,
    location VARCHAR NOT NULL
);
