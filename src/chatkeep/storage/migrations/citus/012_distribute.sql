-- Citus: the schema of 001-012 distributed by room. Applied by the migration runner right
-- after 012_room_change_log.sql, in the same transaction, only when the database has the
-- citus extension (`chatkeep setup --citus`); plain PostgreSQL never runs it. The released
-- files stay as they are: this file changes, on Citus only, what Citus cannot take.
--
-- * users is a reference table (a copy on every node); rooms and everything per room
--   (room_users, messages, room_changes, message_reactions, message_read_status) are
--   distributed by the room id and colocated, so a room's rows live in one shard group.
-- * Unique keys must contain the distribution column: messages' key becomes
--   (room_id, id), and the keys that pointed at messages (id) point at (room_id, id).
--   message_read_status gets the room_id column it lacked (the application writes it).
-- * rooms_direct_pair_key (the pair of a direct room) cannot hold on a table distributed
--   by room id: a direct room's id is made from its pair (MD5 of the two ids) and a CHECK
--   holds every direct room to it, so the primary key is the pair rule.
-- * Policies on distributed tables may not hold subqueries, and a policy or trigger runs
--   on the worker holding the shard: every membership test becomes a per-room function
--   call, chatkeep_room_role_at_least(room, level), whose query is keyed by the room id and
--   so runs on the colocated shard of the same node, inside the same transaction. The
--   array function chatkeep_acting_rooms() (every room of the user: all shards) is not
--   used by any policy or trigger here.
-- * The audit trail (audit_log) is a plain table on every node: a trigger on a shard
--   appends to the copy on its own node, in the same (two-phase committed) transaction.

-- chatkeep:up

-- Whether the acting user's role in `room` is at least `at_least`. As chatkeep_acting_rooms:
-- SECURITY DEFINER owned by chatapp_rls, so the policy on room_users does not recurse.
CREATE FUNCTION chatkeep_room_role_at_least(room uuid, at_least room_role) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM public.room_users ru
                    WHERE ru.room_id = room
                      AND ru.user_id = nullif(current_setting('app.user_id', true), '')::uuid
                      AND ru.role <= at_least);
END
$$;
-- What the insert policy of room_users read from rooms in subqueries, as the definer:
-- the room's type, its creator, and whether two users are its direct pair.
CREATE FUNCTION chatkeep_room_type(room uuid) RETURNS room_type
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT r.type FROM public.rooms r WHERE r.id = room);
END
$$;
CREATE FUNCTION chatkeep_room_created_by(room uuid) RETURNS uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT r.created_by FROM public.rooms r WHERE r.id = room);
END
$$;
CREATE FUNCTION chatkeep_direct_pair_has(room uuid, a uuid, b uuid) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM public.rooms r
                    WHERE r.id = room AND r.type = 'direct'
                      AND a IN (r.direct_user_low, r.direct_user_high)
                      AND b IN (r.direct_user_low, r.direct_user_high));
END
$$;
GRANT CREATE ON SCHEMA public TO chatapp_rls;
ALTER FUNCTION chatkeep_room_role_at_least(uuid, room_role) OWNER TO chatapp_rls;
ALTER FUNCTION chatkeep_room_type(uuid) OWNER TO chatapp_rls;
ALTER FUNCTION chatkeep_room_created_by(uuid) OWNER TO chatapp_rls;
ALTER FUNCTION chatkeep_direct_pair_has(uuid, uuid, uuid) OWNER TO chatapp_rls;
REVOKE CREATE ON SCHEMA public FROM chatapp_rls;
GRANT SELECT (id, type, created_by, direct_user_low, direct_user_high) ON rooms TO chatapp_rls;
REVOKE EXECUTE ON FUNCTION chatkeep_room_role_at_least(uuid, room_role) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_room_type(uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_room_created_by(uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_direct_pair_has(uuid, uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_room_role_at_least(uuid, room_role)
    TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_room_type(uuid) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_room_created_by(uuid) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_direct_pair_has(uuid, uuid, uuid) TO chatapp_app, chatapp_owner;

-- The user policies again, without subqueries (the same rules as 009 and 012).
DROP POLICY users_update ON users;
CREATE POLICY users_update ON users FOR UPDATE TO chatapp_app
    USING (true) WITH CHECK (id = chatkeep_acting_user_id());

DROP POLICY rooms_select ON rooms;
DROP POLICY rooms_insert ON rooms;
DROP POLICY rooms_update ON rooms;
DROP POLICY rooms_delete ON rooms;
CREATE POLICY rooms_select ON rooms FOR SELECT TO chatapp_app
    USING (
        type = 'public'
        OR chatkeep_room_role_at_least(id, 'member')
        OR created_by = chatkeep_acting_user_id()
        OR direct_user_low = chatkeep_acting_user_id()
        OR direct_user_high = chatkeep_acting_user_id()
    );
CREATE POLICY rooms_insert ON rooms FOR INSERT TO chatapp_app
    WITH CHECK (
        created_by = chatkeep_acting_user_id()
        AND (type <> 'direct'
             OR chatkeep_acting_user_id() IN (direct_user_low, direct_user_high))
    );
CREATE POLICY rooms_update ON rooms FOR UPDATE TO chatapp_app
    USING (type = 'public' OR chatkeep_room_role_at_least(id, 'member'))
    WITH CHECK (chatkeep_room_role_at_least(id, 'member'));
CREATE POLICY rooms_delete ON rooms FOR DELETE TO chatapp_app
    USING (type = 'public' OR chatkeep_room_role_at_least(id, 'member'));

DROP POLICY room_users_select ON room_users;
DROP POLICY room_users_insert ON room_users;
DROP POLICY room_users_update ON room_users;
DROP POLICY room_users_delete ON room_users;
CREATE POLICY room_users_select ON room_users FOR SELECT TO chatapp_app
    USING (
        user_id = chatkeep_acting_user_id()
        OR chatkeep_room_role_at_least(room_id, 'member')
    );
CREATE POLICY room_users_insert ON room_users FOR INSERT TO chatapp_app
    WITH CHECK (
        (user_id = chatkeep_acting_user_id()
         AND role = 'member'
         AND chatkeep_room_type(room_id) = 'public')
        OR (user_id = chatkeep_acting_user_id()
            AND role = 'owner'
            AND chatkeep_room_created_by(room_id) = chatkeep_acting_user_id()
            AND chatkeep_room_is_empty(room_id))
        OR chatkeep_direct_pair_has(room_id, chatkeep_acting_user_id(), user_id)
        OR (chatkeep_room_role_at_least(room_id, 'admin')
            AND (role <> 'owner' OR chatkeep_room_role_at_least(room_id, 'owner'))
            AND chatkeep_room_type(room_id) <> 'direct')
    );
CREATE POLICY room_users_update ON room_users FOR UPDATE TO chatapp_app
    USING (
        user_id = chatkeep_acting_user_id()
        OR chatkeep_room_role_at_least(room_id, 'member')
    )
    WITH CHECK (
        (user_id = chatkeep_acting_user_id()
         OR chatkeep_room_role_at_least(room_id, 'admin'))
        AND (role = 'member'
             OR (role = 'admin' AND chatkeep_room_role_at_least(room_id, 'admin'))
             OR (role = 'owner' AND chatkeep_room_role_at_least(room_id, 'owner')))
    );
CREATE POLICY room_users_delete ON room_users FOR DELETE TO chatapp_app
    USING (
        user_id = chatkeep_acting_user_id()
        OR chatkeep_room_role_at_least(room_id, 'member')
    );

DROP POLICY messages_select ON messages;
DROP POLICY messages_insert ON messages;
DROP POLICY messages_update ON messages;
DROP POLICY messages_delete ON messages;
CREATE POLICY messages_select ON messages FOR SELECT TO chatapp_app
    USING (chatkeep_room_role_at_least(room_id, 'member'));
CREATE POLICY messages_insert ON messages FOR INSERT TO chatapp_app
    WITH CHECK (
        user_id = chatkeep_acting_user_id()
        AND chatkeep_room_role_at_least(room_id, 'member')
    );
CREATE POLICY messages_update ON messages FOR UPDATE TO chatapp_app
    USING (chatkeep_room_role_at_least(room_id, 'member'))
    WITH CHECK (
        user_id = chatkeep_acting_user_id()
        AND chatkeep_room_role_at_least(room_id, 'member')
    );
CREATE POLICY messages_delete ON messages FOR DELETE TO chatapp_app
    USING (chatkeep_room_role_at_least(room_id, 'member'));

-- message_read_status gets its room (the application writes it with the receipt).
ALTER TABLE message_read_status DROP CONSTRAINT message_read_status_message_id_fkey;
ALTER TABLE message_read_status DROP CONSTRAINT message_read_status_pkey;
ALTER TABLE message_read_status ADD COLUMN room_id uuid NOT NULL;
ALTER TABLE message_read_status
    ADD CONSTRAINT message_read_status_pkey PRIMARY KEY (room_id, message_id, user_id);
DROP POLICY message_read_status_select ON message_read_status;
DROP POLICY message_read_status_insert ON message_read_status;
DROP POLICY message_read_status_update ON message_read_status;
DROP POLICY message_read_status_delete ON message_read_status;
CREATE POLICY message_read_status_select ON message_read_status FOR SELECT TO chatapp_app
    USING (
        user_id = chatkeep_acting_user_id()
        OR chatkeep_room_role_at_least(room_id, 'member')
    );
CREATE POLICY message_read_status_insert ON message_read_status FOR INSERT TO chatapp_app
    WITH CHECK (
        user_id = chatkeep_acting_user_id()
        AND chatkeep_room_role_at_least(room_id, 'member')
    );
CREATE POLICY message_read_status_update ON message_read_status FOR UPDATE TO chatapp_app
    USING (
        user_id = chatkeep_acting_user_id()
        OR chatkeep_room_role_at_least(room_id, 'member')
    )
    WITH CHECK (user_id = chatkeep_acting_user_id());
CREATE POLICY message_read_status_delete ON message_read_status FOR DELETE TO chatapp_app
    USING (
        user_id = chatkeep_acting_user_id()
        OR chatkeep_room_role_at_least(room_id, 'member')
    );

DROP POLICY room_changes_select ON room_changes;
CREATE POLICY room_changes_select ON room_changes FOR SELECT TO chatapp_app
    USING (chatkeep_room_role_at_least(room_id, 'member'));

-- message_reactions: the application writes room_id (the message's room); the trigger
-- checks the message is in that room rather than looking it up by id in every shard.
ALTER TABLE message_reactions DROP CONSTRAINT message_reactions_message_id_fkey;
ALTER TABLE message_reactions DROP CONSTRAINT message_reactions_pkey;
ALTER TABLE message_reactions
    ADD CONSTRAINT message_reactions_pkey PRIMARY KEY (room_id, message_id, emoji, user_id);
DROP POLICY message_reactions_select ON message_reactions;
DROP POLICY message_reactions_insert ON message_reactions;
DROP POLICY message_reactions_delete ON message_reactions;
CREATE POLICY message_reactions_select ON message_reactions FOR SELECT TO chatapp_app
    USING (chatkeep_room_role_at_least(room_id, 'member'));
CREATE POLICY message_reactions_insert ON message_reactions FOR INSERT TO chatapp_app
    WITH CHECK (
        user_id = chatkeep_acting_user_id()
        AND chatkeep_room_role_at_least(room_id, 'member')
    );
CREATE POLICY message_reactions_delete ON message_reactions FOR DELETE TO chatapp_app
    USING (
        user_id = chatkeep_acting_user_id()
        AND chatkeep_room_role_at_least(room_id, 'member')
    );

CREATE OR REPLACE FUNCTION chatkeep_reaction_room() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.messages m
                    WHERE m.room_id = NEW.room_id AND m.id = NEW.message_id) THEN
        RAISE EXCEPTION 'message % does not exist', NEW.message_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'message_reactions_message_id_fkey',
                  TABLE = 'message_reactions';
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION chatkeep_log_reaction() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r public.message_reactions;
    message_seq bigint;
    how_many bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        r := NEW;
    ELSE
        r := OLD;
    END IF;
    SELECT m.seq INTO message_seq FROM public.messages m
     WHERE m.room_id = r.room_id AND m.id = r.message_id;
    IF message_seq IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM public.rooms WHERE id = r.room_id FOR NO KEY UPDATE;
    SELECT count(*) INTO how_many FROM public.message_reactions x
     WHERE x.room_id = r.room_id AND x.message_id = r.message_id AND x.emoji = r.emoji;
    PERFORM public.chatkeep_log_change(
        r.room_id, CASE TG_OP WHEN 'INSERT' THEN 'reaction.added' ELSE 'reaction.removed' END,
        r.message_id, message_seq,
        jsonb_build_object('user_id', r.user_id, 'emoji', r.emoji, 'count', how_many));
    RETURN NULL;
END
$$;

-- The guard trigger of 009, with per-room role tests. On a worker a trigger fires on a
-- shard, whose name is the table's with _<shard id> after it: the table is that name
-- without its suffix.
CREATE OR REPLACE FUNCTION chatkeep_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    acting uuid := chatkeep_acting_user_id();
    allowed boolean;
    tbl text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
BEGIN
    IF pg_trigger_depth() > 1 OR pg_has_role(current_user, 'chatapp_owner', 'MEMBER') THEN
        allowed := true;
    ELSE
        CASE tbl || '.' || TG_OP
        WHEN 'users.DELETE' THEN
            allowed := OLD.id = acting;
        WHEN 'rooms.DELETE' THEN
            allowed := chatkeep_room_role_at_least(OLD.id, 'owner');
        WHEN 'rooms.UPDATE' THEN
            allowed := chatkeep_room_role_at_least(OLD.id, 'admin');
        WHEN 'room_users.DELETE' THEN
            allowed := OLD.user_id = acting
                OR chatkeep_room_role_at_least(OLD.room_id, 'owner')
                OR (OLD.role <> 'owner' AND chatkeep_room_role_at_least(OLD.room_id, 'admin'));
        WHEN 'room_users.UPDATE' THEN
            IF OLD.user_id = acting THEN
                allowed := true;
            ELSE
                allowed := (NEW.last_read_seq, NEW.last_read_at)
                           IS NOT DISTINCT FROM (OLD.last_read_seq, OLD.last_read_at)
                    AND (chatkeep_room_role_at_least(OLD.room_id, 'owner')
                         OR (OLD.role <> 'owner'
                             AND chatkeep_room_role_at_least(OLD.room_id, 'admin')));
            END IF;
        WHEN 'messages.DELETE' THEN
            allowed := OLD.user_id = acting
                OR chatkeep_room_role_at_least(OLD.room_id, 'admin');
        WHEN 'message_read_status.DELETE' THEN
            allowed := OLD.user_id = acting;
        ELSE
            RAISE EXCEPTION 'chatkeep_guard() is not meant for % on %', TG_OP, tbl;
        END CASE;
    END IF;
    IF allowed IS NOT TRUE THEN
        RAISE EXCEPTION 'permission denied: % on % is not allowed for this user',
                        lower(TG_OP), tbl
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$;

-- The audit trigger of 010, naming the table, not the shard (as chatkeep_guard above).
CREATE OR REPLACE FUNCTION chatkeep_audit_row() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    what    text;
    row_key uuid;
    room    uuid;
    changed jsonb := '{}';
    gone    boolean := false;
    tbl     text := regexp_replace(TG_TABLE_NAME, '_[0-9]+$', '');
BEGIN
    -- A row removed by a cascade is not recorded on its own: the parent's delete is the
    -- record. Cascaded rows' AFTER triggers fire at the end of the outer statement, when
    -- the parent is already gone, and that is how they are told apart.
    IF TG_OP = 'DELETE' THEN
        IF tbl = 'messages' THEN
            gone := NOT EXISTS (SELECT 1 FROM public.rooms r WHERE r.id = OLD.room_id)
                 OR NOT EXISTS (SELECT 1 FROM public.users u WHERE u.id = OLD.user_id);
        ELSIF tbl = 'room_users' THEN
            gone := NOT EXISTS (SELECT 1 FROM public.rooms r WHERE r.id = OLD.room_id)
                 OR NOT EXISTS (SELECT 1 FROM public.users u WHERE u.id = OLD.user_id);
        ELSIF tbl = 'rooms' THEN
            gone := NOT EXISTS (SELECT 1 FROM public.users u WHERE u.id = OLD.created_by);
        END IF;
        IF gone THEN
            RETURN NULL;
        END IF;
    END IF;
    CASE tbl || '.' || TG_OP
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
        RAISE EXCEPTION 'chatkeep_audit_row() is not meant for % on %', TG_OP, tbl;
    END CASE;
    INSERT INTO public.audit_log (actor_id, action, table_name, row_id, room_id, changes)
    VALUES (nullif(current_setting('app.user_id', true), '')::uuid,
            what, tbl, row_key, room, changed);
    RETURN NULL;
END
$$;

-- The direct pair's unique key cannot include the room id: a direct room's id is made
-- from its pair instead (chatkeep.storage.rooms.direct_room_id), so the primary key holds
-- the pair rule, and this CHECK holds every direct room to that id.
ALTER TABLE rooms DROP CONSTRAINT rooms_direct_pair_key;
ALTER TABLE rooms ADD CONSTRAINT rooms_direct_id_check
    CHECK (type <> 'direct' OR id = md5(direct_user_low::text || direct_user_high::text)::uuid);
ALTER TABLE messages DROP CONSTRAINT messages_pkey;
ALTER TABLE messages ADD CONSTRAINT messages_pkey PRIMARY KEY (room_id, id);

-- Triggers on distributed tables run on the workers: every query they make is keyed by
-- the row's room (colocated, local) or reads the reference table users.
SET LOCAL citus.enable_unsafe_triggers = on;
SET LOCAL citus.multi_shard_modify_mode = 'sequential';

-- The audit trail: the same table on every worker (010 made the coordinator's).
SELECT run_command_on_workers($ddl$
    CREATE TABLE IF NOT EXISTS public.audit_log (
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
        transaction_id   xid8        NOT NULL DEFAULT pg_current_xact_id()
    )
$ddl$);

-- Foreign keys between tables about to be distributed are dropped first and made again
-- once all are colocated (Citus refuses one from a local table to a distributed one).
ALTER TABLE room_users DROP CONSTRAINT room_users_room_id_fkey;
ALTER TABLE messages DROP CONSTRAINT messages_room_id_fkey;
ALTER TABLE room_changes DROP CONSTRAINT room_changes_room_id_fkey;

SELECT create_reference_table('users');
SELECT create_distributed_table('rooms', 'id');
SELECT create_distributed_table('room_users', 'room_id', colocate_with => 'rooms');
SELECT create_distributed_table('messages', 'room_id', colocate_with => 'rooms');
SELECT create_distributed_table('room_changes', 'room_id', colocate_with => 'rooms');
SELECT create_distributed_table('message_reactions', 'room_id', colocate_with => 'rooms');
SELECT create_distributed_table('message_read_status', 'room_id', colocate_with => 'rooms');
ALTER TABLE room_users ADD CONSTRAINT room_users_room_id_fkey
    FOREIGN KEY (room_id) REFERENCES rooms (id) ON DELETE CASCADE;
ALTER TABLE messages ADD CONSTRAINT messages_room_id_fkey
    FOREIGN KEY (room_id) REFERENCES rooms (id) ON DELETE CASCADE;
ALTER TABLE room_changes ADD CONSTRAINT room_changes_room_id_fkey
    FOREIGN KEY (room_id) REFERENCES rooms (id) ON DELETE CASCADE;
ALTER TABLE message_reactions
    ADD CONSTRAINT message_reactions_message_id_fkey FOREIGN KEY (room_id, message_id)
        REFERENCES messages (room_id, id) ON DELETE CASCADE;
ALTER TABLE message_read_status
    ADD CONSTRAINT message_read_status_message_id_fkey FOREIGN KEY (room_id, message_id)
        REFERENCES messages (room_id, id) ON DELETE CASCADE;

-- Citus fills the defaults of an INSERT on the coordinator and sends the shard every
-- column, so the shards (and the workers' copies of the tables) take a table-wide INSERT
-- from the application role. The coordinator's tables, which the application's statements
-- name and are checked against before they are planned, keep 011's column grants (granted
-- again here with DDL propagation off, so they stay on the coordinator): the role still
-- chooses only its columns. The application connects to the coordinator only.
GRANT INSERT ON users, rooms, room_users, messages, message_read_status, message_reactions
    TO chatapp_app;
SET LOCAL citus.enable_ddl_propagation = off;
REVOKE INSERT ON users, rooms, room_users, messages, message_read_status, message_reactions
    FROM chatapp_app;
GRANT INSERT (id, email, password_hash, username, avatar_url) ON users TO chatapp_app;
GRANT INSERT (id, name, description, type, created_by, direct_user_low, direct_user_high)
    ON rooms TO chatapp_app;
GRANT INSERT (room_id, user_id, role) ON room_users TO chatapp_app;
GRANT INSERT (id, room_id, user_id, client_msg_id, content, type) ON messages TO chatapp_app;
GRANT INSERT (room_id, message_id, user_id) ON message_read_status TO chatapp_app;
GRANT INSERT (room_id, message_id, emoji, user_id) ON message_reactions TO chatapp_app;
SET LOCAL citus.enable_ddl_propagation = on;
