-- Least privilege: what each chatkeep role may do with the tables (docs/security.md).
--
-- chatapp_owner owns everything (migrations run as it); chatapp_app gets only the DML the
-- application needs, UPDATE limited to the columns it may change, so no bug can move a
-- message to another room or a membership to another user; chatapp_readonly reads
-- everything but password hashes. Row security (009) then limits which rows.
--
-- The roles are cluster-wide and made by `chatkeep setup`, which must run first.

-- chatkeep:up
DO $$
BEGIN
    IF (SELECT count(*) FROM pg_roles
         WHERE rolname IN ('chatapp_owner', 'chatapp_migrator', 'chatapp_app',
                           'chatapp_readonly', 'chatapp_rls')) < 5 THEN
        RAISE EXCEPTION 'the chatapp_* roles do not exist'
            USING ERRCODE = 'undefined_object',
                  HINT = 'run `chatkeep setup` as a superuser first';
    END IF;
END
$$;

GRANT SELECT, INSERT, DELETE ON users, rooms, room_users, messages, message_read_status
    TO chatapp_app;
GRANT UPDATE (email, password_hash, username, avatar_url, is_active, last_seen, updated_at)
    ON users TO chatapp_app;
GRANT UPDATE (name, description, type, is_active, last_seq, updated_at)
    ON rooms TO chatapp_app;
GRANT UPDATE (role, last_read_at, last_read_seq) ON room_users TO chatapp_app;
GRANT UPDATE (content, type, is_edited, edited_at) ON messages TO chatapp_app;
GRANT UPDATE (read_at) ON message_read_status TO chatapp_app;

GRANT SELECT ON rooms, room_users, messages, message_read_status TO chatapp_readonly;
GRANT SELECT (id, email, username, avatar_url, is_active, last_seen, created_at, updated_at)
    ON users TO chatapp_readonly;

-- `chatkeep doctor` reports the schema state from whatever role it connects as.
GRANT SELECT ON chatkeep_schema_history TO chatapp_app, chatapp_readonly;

-- Tables later migrations create (as chatapp_owner) start with the same grants; each such
-- migration must still enable row security on its table (tests/security checks it).
ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO chatapp_app;
ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO chatapp_app;
ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    GRANT SELECT ON TABLES TO chatapp_readonly;

-- chatkeep:down
ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    REVOKE SELECT ON TABLES FROM chatapp_readonly;
ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    REVOKE USAGE, SELECT ON SEQUENCES FROM chatapp_app;
ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    REVOKE SELECT, INSERT, UPDATE, DELETE ON TABLES FROM chatapp_app;
REVOKE ALL ON chatkeep_schema_history FROM chatapp_app, chatapp_readonly;
REVOKE ALL ON users, rooms, room_users, messages, message_read_status
    FROM chatapp_app, chatapp_readonly;
