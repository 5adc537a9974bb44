-- Users, and the UUIDv7 default every table's primary key uses.
--
-- Ids are normally made in Python (chatkeep.ids.uuid7) so a client knows its id before the
-- insert; the SQL default serves rows inserted by hand. PostgreSQL 18 has uuidv7() built in;
-- before 18 the same layout (RFC 9562: 48-bit Unix milliseconds, version 7, variant 10) is
-- built from gen_random_uuid(), which is core since PostgreSQL 13.

-- chatkeep:up
DO $do$
BEGIN
    IF current_setting('server_version_num')::int >= 180000 THEN
        EXECUTE $fn$
            CREATE FUNCTION chatkeep_uuidv7() RETURNS uuid
            LANGUAGE sql VOLATILE PARALLEL SAFE
            AS 'SELECT uuidv7()'
        $fn$;
    ELSE
        EXECUTE $fn$
            CREATE FUNCTION chatkeep_uuidv7() RETURNS uuid
            LANGUAGE sql VOLATILE PARALLEL SAFE
            AS $body$
                SELECT encode(
                    set_bit(set_bit(
                        overlay(uuid_send(gen_random_uuid())
                                PLACING substring(int8send(
                                    floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint
                                ) FROM 3)
                                FROM 1 FOR 6),
                        52, 1), 53, 1),
                    'hex')::uuid
            $body$
        $fn$;
    END IF;
END
$do$;

COMMENT ON FUNCTION chatkeep_uuidv7() IS
    'UUIDv7 (time-ordered) default for primary keys; uuidv7() on PostgreSQL 18+';

CREATE TABLE users (
    id            uuid        PRIMARY KEY DEFAULT chatkeep_uuidv7(),
    email         text        NOT NULL,
    password_hash text        NOT NULL,
    username      text        NOT NULL,
    avatar_url    text,
    is_active     boolean     NOT NULL DEFAULT true,
    last_seen     timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_email_check
        CHECK (char_length(email) BETWEEN 3 AND 254 AND position('@' IN email) > 1),
    CONSTRAINT users_username_check
        CHECK (char_length(username) BETWEEN 3 AND 32 AND btrim(username) = username),
    -- bcrypt hashes are 60 characters: $2b$12$ + 53
    CONSTRAINT users_password_hash_check
        CHECK (password_hash ~ '^\$2[abxy]\$[0-9]{2}\$[./A-Za-z0-9]{53}$'),
    CONSTRAINT users_avatar_url_check
        CHECK (avatar_url IS NULL
               OR (char_length(avatar_url) <= 2048 AND avatar_url ~* '^https?://'))
);

-- Case-insensitive uniqueness: these unique indexes are also the look-up indexes for
-- "find by email/username".
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));
CREATE UNIQUE INDEX users_username_lower_key ON users (lower(username));

COMMENT ON TABLE users IS 'Accounts; password_hash never leaves the storage layer';

-- chatkeep:down
DROP TABLE users;
DROP FUNCTION chatkeep_uuidv7();
