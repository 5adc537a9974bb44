-- The audit trail: an append-only record of sensitive changes, written by triggers so no
-- code path can skip it. Each row names the acting user (app.user_id; NULL for system
-- work), the database role, the action, the row, what changed (as jsonb, never a secret:
-- a password change is recorded as changed, not as its hash), the transaction's time,
-- the application name and the client address.
--
-- Audited: users' email, password and active changes and deletes; role changes and
-- removals in room_users; room deletes and type changes; message deletes by someone other
-- than the author. Rows removed by a cascade are not logged one by one: the delete that
-- caused the cascade is.
--
-- chatapp_app holds no privilege on audit_log at all: rows arrive through the SECURITY
-- DEFINER trigger function, owned by the table's owner. A trigger refuses UPDATE, DELETE
-- and TRUNCATE for everyone.

-- chatkeep:up
CREATE TABLE audit_log (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at      timestamptz NOT NULL DEFAULT transaction_timestamp(),
    actor_id         uuid,
    db_role          text        NOT NULL DEFAULT session_user,
    action           text        NOT NULL,
    table_name       text        NOT NULL,
    row_id           uuid        NOT NULL,
    room_id          uuid,
    changes          jsonb       NOT NULL DEFAULT '{}',
    application_name text        NOT NULL DEFAULT current_setting('application_name'),
    client_addr      inet        DEFAULT inet_client_addr(),
    transaction_id   xid8        NOT NULL DEFAULT pg_current_xact_id(),
    CONSTRAINT audit_log_action_check CHECK (action IN (
        'user.update', 'user.delete', 'member.role_change', 'member.remove',
        'room.delete', 'room.type_change', 'message.delete'
    ))
);

COMMENT ON TABLE audit_log IS
    'Append-only record of sensitive changes, written by triggers (chatkeep_audit_row)';
COMMENT ON COLUMN audit_log.actor_id IS 'The acting user (app.user_id); NULL for system work';
COMMENT ON COLUMN audit_log.row_id IS
    'Primary key of the changed row (for room_users: the member''s user id)';

-- New table, empty: a plain index locks nothing anyone waits on.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX audit_log_row_idx ON audit_log (table_name, row_id, id);
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX audit_log_actor_idx ON audit_log (actor_id, id) WHERE actor_id IS NOT NULL;

REVOKE ALL ON audit_log FROM chatapp_app;
REVOKE ALL ON SEQUENCE audit_log_id_seq FROM chatapp_app;
GRANT SELECT ON audit_log TO chatapp_readonly;

CREATE FUNCTION chatkeep_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION chatkeep_audit_append_only();

CREATE FUNCTION chatkeep_audit_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    what    text;
    row_key uuid;
    room    uuid;
    changed jsonb := '{}';
    gone    boolean := false;
BEGIN
    -- A row removed by a cascade is not recorded on its own: the parent's delete is the
    -- record. Cascaded rows' AFTER triggers fire at the end of the outer statement, when
    -- the parent is already gone, and that is how they are told apart.
    IF TG_OP = 'DELETE' THEN
        IF TG_TABLE_NAME = 'messages' THEN
            gone := NOT EXISTS (SELECT 1 FROM public.rooms r WHERE r.id = OLD.room_id)
                 OR NOT EXISTS (SELECT 1 FROM public.users u WHERE u.id = OLD.user_id);
        ELSIF TG_TABLE_NAME = 'room_users' THEN
            gone := NOT EXISTS (SELECT 1 FROM public.rooms r WHERE r.id = OLD.room_id)
                 OR NOT EXISTS (SELECT 1 FROM public.users u WHERE u.id = OLD.user_id);
        ELSIF TG_TABLE_NAME = 'rooms' THEN
            gone := NOT EXISTS (SELECT 1 FROM public.users u WHERE u.id = OLD.created_by);
        END IF;
        IF gone THEN
            RETURN NULL;
        END IF;
    END IF;
    CASE TG_TABLE_NAME || '.' || TG_OP
    WHEN 'users.UPDATE' THEN
        what := 'user.update';
        row_key := NEW.id;
        IF OLD.email IS DISTINCT FROM NEW.email THEN
            changed := changed || jsonb_build_object(
                'email', jsonb_build_object('old', OLD.email, 'new', NEW.email));
        END IF;
        IF OLD.password_hash IS DISTINCT FROM NEW.password_hash THEN
            changed := changed || jsonb_build_object('password', 'changed');
        END IF;
        IF OLD.is_active IS DISTINCT FROM NEW.is_active THEN
            changed := changed || jsonb_build_object(
                'is_active', jsonb_build_object('old', OLD.is_active, 'new', NEW.is_active));
        END IF;
    WHEN 'users.DELETE' THEN
        what := 'user.delete';
        row_key := OLD.id;
        changed := jsonb_build_object('email', OLD.email, 'username', OLD.username);
    WHEN 'room_users.UPDATE' THEN
        what := 'member.role_change';
        row_key := NEW.user_id;
        room := NEW.room_id;
        changed := jsonb_build_object(
            'role', jsonb_build_object('old', OLD.role, 'new', NEW.role));
    WHEN 'room_users.DELETE' THEN
        what := 'member.remove';
        row_key := OLD.user_id;
        room := OLD.room_id;
        changed := jsonb_build_object('role', OLD.role);
    WHEN 'rooms.UPDATE' THEN
        what := 'room.type_change';
        row_key := NEW.id;
        room := NEW.id;
        changed := jsonb_build_object(
            'type', jsonb_build_object('old', OLD.type, 'new', NEW.type));
    WHEN 'rooms.DELETE' THEN
        what := 'room.delete';
        row_key := OLD.id;
        room := OLD.id;
        changed := jsonb_build_object(
            'name', OLD.name, 'type', OLD.type, 'created_by', OLD.created_by);
    WHEN 'messages.DELETE' THEN
        what := 'message.delete';
        row_key := OLD.id;
        room := OLD.room_id;
        -- Who wrote it and where it sat; never what it said.
        changed := jsonb_build_object('author_id', OLD.user_id, 'seq', OLD.seq);
    ELSE
        RAISE EXCEPTION 'chatkeep_audit_row() is not meant for % on %', TG_OP, TG_TABLE_NAME;
    END CASE;
    INSERT INTO public.audit_log (actor_id, action, table_name, row_id, room_id, changes)
    VALUES (nullif(current_setting('app.user_id', true), '')::uuid,
            what, TG_TABLE_NAME, row_key, room, changed);
    RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION chatkeep_audit_row() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_audit_append_only() FROM PUBLIC;

CREATE TRIGGER users_audit_update AFTER UPDATE ON users
    FOR EACH ROW
    WHEN ((OLD.email, OLD.password_hash, OLD.is_active)
          IS DISTINCT FROM (NEW.email, NEW.password_hash, NEW.is_active))
    EXECUTE FUNCTION chatkeep_audit_row();
CREATE TRIGGER users_audit_delete AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION chatkeep_audit_row();
CREATE TRIGGER room_users_audit_update AFTER UPDATE ON room_users
    FOR EACH ROW WHEN (OLD.role IS DISTINCT FROM NEW.role)
    EXECUTE FUNCTION chatkeep_audit_row();
CREATE TRIGGER room_users_audit_delete AFTER DELETE ON room_users
    FOR EACH ROW EXECUTE FUNCTION chatkeep_audit_row();
CREATE TRIGGER rooms_audit_update AFTER UPDATE ON rooms
    FOR EACH ROW WHEN (OLD.type IS DISTINCT FROM NEW.type)
    EXECUTE FUNCTION chatkeep_audit_row();
CREATE TRIGGER rooms_audit_delete AFTER DELETE ON rooms
    FOR EACH ROW EXECUTE FUNCTION chatkeep_audit_row();
CREATE TRIGGER messages_audit_delete AFTER DELETE ON messages
    FOR EACH ROW
    WHEN (OLD.user_id IS DISTINCT FROM nullif(current_setting('app.user_id', true), '')::uuid)
    EXECUTE FUNCTION chatkeep_audit_row();

-- chatkeep:down
DROP TRIGGER messages_audit_delete ON messages;
DROP TRIGGER rooms_audit_delete ON rooms;
DROP TRIGGER rooms_audit_update ON rooms;
DROP TRIGGER room_users_audit_delete ON room_users;
DROP TRIGGER room_users_audit_update ON room_users;
DROP TRIGGER users_audit_delete ON users;
DROP TRIGGER users_audit_update ON users;
DROP FUNCTION chatkeep_audit_row();
DROP TABLE audit_log;
DROP FUNCTION chatkeep_audit_append_only();
