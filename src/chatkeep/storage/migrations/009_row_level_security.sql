-- Row-level security: the database itself confines chatapp_app to the acting user's rows,
-- so a bug in application code cannot read or change another user's private rooms.
--
-- The acting user is set per transaction with set_config('app.user_id', <uuid>, true)
-- (chatkeep.storage.security.acting_as) and read by chatkeep_acting_user_id(), always
-- inside a sub-select, so each statement evaluates it once (an InitPlan), not per row.
--
-- Membership comes from chatkeep_acting_rooms(level), SECURITY DEFINER: a policy on
-- room_users cannot read room_users through its own policy. Its owner is chatapp_rls, a
-- NOLOGIN role with BYPASSRLS that owns nothing else: owned by chatapp_owner, whom FORCE
-- binds, the function's own query would go through the same policies again and recurse
-- until the stack ran out. It returns an array, called once per statement in a sub-select;
-- a policy then only tests `room_id = ANY (...)` per row.
--
-- Policies say what a user may SEE (USING) and what a row must look like after a write
-- (WITH CHECK); a write that breaks WITH CHECK is an error (PermissionDenied), not a
-- silent no-op. Rules that compare the old row with the new one, and deletes (which have
-- no WITH CHECK), are enforced by guard triggers that raise insufficient_privilege.
--
-- Roles: chatapp_app gets the user policies; chatapp_readonly reads every row;
-- chatapp_owner (migrations, maintenance: system work, explicit and separate) has an
-- explicit all-rows policy, since FORCE binds it too. Any other role sees nothing.

-- chatkeep:up
CREATE FUNCTION chatkeep_acting_user_id() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT nullif(current_setting('app.user_id', true), '')::uuid $$;

COMMENT ON FUNCTION chatkeep_acting_user_id() IS
    'The acting user of this transaction (app.user_id), or NULL for none';

-- Rooms where the acting user's role is at least `at_least` (owner > admin > member; the
-- enum sorts owner first). PL/pgSQL rather than SQL: it keeps its query's plan for the
-- session, where a SQL function called once per statement is parsed and planned on every
-- call (about ten times the cost of the query itself before PostgreSQL 18).
CREATE FUNCTION chatkeep_acting_rooms(at_least room_role) RETURNS uuid[]
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(ru.room_id), '{}')
              FROM public.room_users ru
             WHERE ru.user_id = nullif(current_setting('app.user_id', true), '')::uuid
               AND ru.role <= at_least);
END
$$;

-- Whether a room has no members yet: its creator may then make themself its owner.
CREATE FUNCTION chatkeep_room_is_empty(room uuid) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN NOT EXISTS (SELECT 1 FROM public.room_users ru WHERE ru.room_id = room);
END
$$;

-- Before 16, a non-superuser may give a function to a role only if that role may create
-- in its schema; chatapp_rls needs it for these two statements alone.
GRANT CREATE ON SCHEMA public TO chatapp_rls;
ALTER FUNCTION chatkeep_acting_rooms(room_role) OWNER TO chatapp_rls;
ALTER FUNCTION chatkeep_room_is_empty(uuid) OWNER TO chatapp_rls;
REVOKE CREATE ON SCHEMA public FROM chatapp_rls;
GRANT SELECT ON room_users TO chatapp_rls;
REVOKE EXECUTE ON FUNCTION chatkeep_acting_rooms(room_role) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_room_is_empty(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_acting_rooms(room_role) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_room_is_empty(uuid) TO chatapp_app, chatapp_owner;

-- users: everyone is visible (sign-in, mentions, member lists) and anyone may sign up;
-- a user changes and deletes only themself.
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY users_select ON users FOR SELECT TO chatapp_app USING (true);
CREATE POLICY users_insert ON users FOR INSERT TO chatapp_app WITH CHECK (true);
CREATE POLICY users_update ON users FOR UPDATE TO chatapp_app
    USING (true)
    WITH CHECK (id = (SELECT chatkeep_acting_user_id()));
CREATE POLICY users_delete ON users FOR DELETE TO chatapp_app USING (true);

-- rooms: public rooms for everyone; private and direct rooms for their members (and for
-- their creator and the two people of a direct room, so the room can be set up before
-- anyone is a member). Members update the room (sending a message moves last_seq); only
-- admins and owners change its name, description, type or state; only owners delete it.
ALTER TABLE rooms ENABLE ROW LEVEL SECURITY;
ALTER TABLE rooms FORCE ROW LEVEL SECURITY;
CREATE POLICY rooms_select ON rooms FOR SELECT TO chatapp_app
    USING (
        type = 'public'
        OR id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
        OR created_by = (SELECT chatkeep_acting_user_id())
        OR direct_user_low = (SELECT chatkeep_acting_user_id())
        OR direct_user_high = (SELECT chatkeep_acting_user_id())
    );
CREATE POLICY rooms_insert ON rooms FOR INSERT TO chatapp_app
    WITH CHECK (
        created_by = (SELECT chatkeep_acting_user_id())
        AND (type <> 'direct'
             OR (SELECT chatkeep_acting_user_id()) IN (direct_user_low, direct_user_high))
    );
CREATE POLICY rooms_update ON rooms FOR UPDATE TO chatapp_app
    USING (
        type = 'public'
        OR id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    )
    WITH CHECK (id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));
CREATE POLICY rooms_delete ON rooms FOR DELETE TO chatapp_app
    USING (
        type = 'public'
        OR id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );

-- room_users: you see your own memberships and the members of your rooms. You join a
-- public room as a member; a room's creator becomes owner of the room while it is empty;
-- either person of a direct room adds either person; admins add members and admins, and
-- owners add anyone. Roles change only downwards from your own level.
ALTER TABLE room_users ENABLE ROW LEVEL SECURITY;
ALTER TABLE room_users FORCE ROW LEVEL SECURITY;
CREATE POLICY room_users_select ON room_users FOR SELECT TO chatapp_app
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
CREATE POLICY room_users_insert ON room_users FOR INSERT TO chatapp_app
    WITH CHECK (
        (user_id = (SELECT chatkeep_acting_user_id())
         AND role = 'member'
         AND EXISTS (SELECT 1 FROM rooms r
                      WHERE r.id = room_users.room_id AND r.type = 'public'))
        OR (user_id = (SELECT chatkeep_acting_user_id())
            AND role = 'owner'
            AND EXISTS (SELECT 1 FROM rooms r
                         WHERE r.id = room_users.room_id
                           AND r.created_by = (SELECT chatkeep_acting_user_id()))
            AND chatkeep_room_is_empty(room_id))
        OR EXISTS (SELECT 1 FROM rooms r
                    WHERE r.id = room_users.room_id AND r.type = 'direct'
                      AND (SELECT chatkeep_acting_user_id())
                          IN (r.direct_user_low, r.direct_user_high)
                      AND room_users.user_id IN (r.direct_user_low, r.direct_user_high))
        OR (room_id = ANY ((SELECT chatkeep_acting_rooms('admin'))::uuid[])
            AND (role <> 'owner' OR room_id = ANY ((SELECT chatkeep_acting_rooms('owner'))::uuid[]))
            AND EXISTS (SELECT 1 FROM rooms r
                         WHERE r.id = room_users.room_id AND r.type <> 'direct'))
    );
CREATE POLICY room_users_update ON room_users FOR UPDATE TO chatapp_app
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    )
    WITH CHECK (
        (user_id = (SELECT chatkeep_acting_user_id())
         OR room_id = ANY ((SELECT chatkeep_acting_rooms('admin'))::uuid[]))
        AND (role = 'member'
             OR (role = 'admin'
                 AND room_id = ANY ((SELECT chatkeep_acting_rooms('admin'))::uuid[]))
             OR (role = 'owner'
                 AND room_id = ANY ((SELECT chatkeep_acting_rooms('owner'))::uuid[])))
    );
CREATE POLICY room_users_delete ON room_users FOR DELETE TO chatapp_app
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );

-- messages: members read and write their rooms' messages; only the author edits one;
-- the author, or an admin or owner of the room, deletes one.
ALTER TABLE messages ENABLE ROW LEVEL SECURITY;
ALTER TABLE messages FORCE ROW LEVEL SECURITY;
CREATE POLICY messages_select ON messages FOR SELECT TO chatapp_app
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));
CREATE POLICY messages_insert ON messages FOR INSERT TO chatapp_app
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
CREATE POLICY messages_update ON messages FOR UPDATE TO chatapp_app
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]))
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
CREATE POLICY messages_delete ON messages FOR DELETE TO chatapp_app
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));

-- message_read_status: receipts of messages you can see; you write only your own.
ALTER TABLE message_read_status ENABLE ROW LEVEL SECURITY;
ALTER TABLE message_read_status FORCE ROW LEVEL SECURITY;
CREATE POLICY message_read_status_select ON message_read_status FOR SELECT TO chatapp_app
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR EXISTS (SELECT 1 FROM messages m WHERE m.id = message_read_status.message_id)
    );
CREATE POLICY message_read_status_insert ON message_read_status FOR INSERT TO chatapp_app
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND EXISTS (SELECT 1 FROM messages m WHERE m.id = message_read_status.message_id)
    );
CREATE POLICY message_read_status_update ON message_read_status FOR UPDATE TO chatapp_app
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR EXISTS (SELECT 1 FROM messages m WHERE m.id = message_read_status.message_id)
    )
    WITH CHECK (user_id = (SELECT chatkeep_acting_user_id()));
CREATE POLICY message_read_status_delete ON message_read_status FOR DELETE TO chatapp_app
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR EXISTS (SELECT 1 FROM messages m WHERE m.id = message_read_status.message_id)
    );

-- Reporting reads everything (password hashes are withheld by column grants, 008).
CREATE POLICY users_readonly ON users FOR SELECT TO chatapp_readonly USING (true);
CREATE POLICY rooms_readonly ON rooms FOR SELECT TO chatapp_readonly USING (true);
CREATE POLICY room_users_readonly ON room_users FOR SELECT TO chatapp_readonly USING (true);
CREATE POLICY messages_readonly ON messages FOR SELECT TO chatapp_readonly USING (true);
CREATE POLICY message_read_status_readonly ON message_read_status FOR SELECT
    TO chatapp_readonly USING (true);

-- System work, as the owner: explicit, and only through the migrator's login.
CREATE POLICY users_system ON users TO chatapp_owner USING (true) WITH CHECK (true);
CREATE POLICY rooms_system ON rooms TO chatapp_owner USING (true) WITH CHECK (true);
CREATE POLICY room_users_system ON room_users TO chatapp_owner
    USING (true) WITH CHECK (true);
CREATE POLICY messages_system ON messages TO chatapp_owner USING (true) WITH CHECK (true);
CREATE POLICY message_read_status_system ON message_read_status TO chatapp_owner
    USING (true) WITH CHECK (true);

-- Guards: the checks a policy cannot express. They bind the application role only (the
-- owner's members and superusers do system work) and skip rows deleted by a cascade,
-- which the delete of the parent row was already checked for.
CREATE FUNCTION chatkeep_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
    acting uuid := chatkeep_acting_user_id();
    allowed boolean;
BEGIN
    IF pg_trigger_depth() > 1 OR pg_has_role(current_user, 'chatapp_owner', 'MEMBER') THEN
        allowed := true;
    ELSE
        CASE TG_TABLE_NAME || '.' || TG_OP
        WHEN 'users.DELETE' THEN
            allowed := OLD.id = acting;
        WHEN 'rooms.DELETE' THEN
            allowed := OLD.id = ANY (chatkeep_acting_rooms('owner'));
        WHEN 'rooms.UPDATE' THEN
            -- Only called when name, description, type or is_active change (see WHEN).
            allowed := OLD.id = ANY (chatkeep_acting_rooms('admin'));
        WHEN 'room_users.DELETE' THEN
            allowed := OLD.user_id = acting
                OR OLD.room_id = ANY (chatkeep_acting_rooms('owner'))
                OR (OLD.role <> 'owner' AND OLD.room_id = ANY (chatkeep_acting_rooms('admin')));
        WHEN 'room_users.UPDATE' THEN
            IF OLD.user_id = acting THEN
                allowed := true;  -- own read state; the policy caps a role change
            ELSE
                -- Someone else's row: only the role, by an admin (an owner for owners' rows).
                allowed := (NEW.last_read_seq, NEW.last_read_at)
                           IS NOT DISTINCT FROM (OLD.last_read_seq, OLD.last_read_at)
                    AND (OLD.room_id = ANY (chatkeep_acting_rooms('owner'))
                         OR (OLD.role <> 'owner'
                             AND OLD.room_id = ANY (chatkeep_acting_rooms('admin'))));
            END IF;
        WHEN 'messages.DELETE' THEN
            allowed := OLD.user_id = acting
                OR OLD.room_id = ANY (chatkeep_acting_rooms('admin'));
        WHEN 'message_read_status.DELETE' THEN
            allowed := OLD.user_id = acting;
        ELSE
            RAISE EXCEPTION 'chatkeep_guard() is not meant for % on %', TG_OP, TG_TABLE_NAME;
        END CASE;
    END IF;
    IF allowed IS NOT TRUE THEN
        RAISE EXCEPTION 'permission denied: % on % is not allowed for this user',
                        lower(TG_OP), TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER users_guard BEFORE DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION chatkeep_guard();
CREATE TRIGGER rooms_guard_delete BEFORE DELETE ON rooms
    FOR EACH ROW EXECUTE FUNCTION chatkeep_guard();
CREATE TRIGGER rooms_guard_update BEFORE UPDATE ON rooms
    FOR EACH ROW
    WHEN ((OLD.name, OLD.description, OLD.type, OLD.is_active)
          IS DISTINCT FROM (NEW.name, NEW.description, NEW.type, NEW.is_active))
    EXECUTE FUNCTION chatkeep_guard();
CREATE TRIGGER room_users_guard BEFORE UPDATE OR DELETE ON room_users
    FOR EACH ROW EXECUTE FUNCTION chatkeep_guard();
CREATE TRIGGER messages_guard BEFORE DELETE ON messages
    FOR EACH ROW EXECUTE FUNCTION chatkeep_guard();
CREATE TRIGGER message_read_status_guard BEFORE DELETE ON message_read_status
    FOR EACH ROW EXECUTE FUNCTION chatkeep_guard();

-- chatkeep:down
DROP TRIGGER message_read_status_guard ON message_read_status;
DROP TRIGGER messages_guard ON messages;
DROP TRIGGER room_users_guard ON room_users;
DROP TRIGGER rooms_guard_update ON rooms;
DROP TRIGGER rooms_guard_delete ON rooms;
DROP TRIGGER users_guard ON users;
DROP FUNCTION chatkeep_guard();

DROP POLICY message_read_status_system ON message_read_status;
DROP POLICY messages_system ON messages;
DROP POLICY room_users_system ON room_users;
DROP POLICY rooms_system ON rooms;
DROP POLICY users_system ON users;
DROP POLICY message_read_status_readonly ON message_read_status;
DROP POLICY messages_readonly ON messages;
DROP POLICY room_users_readonly ON room_users;
DROP POLICY rooms_readonly ON rooms;
DROP POLICY users_readonly ON users;

DROP POLICY message_read_status_delete ON message_read_status;
DROP POLICY message_read_status_update ON message_read_status;
DROP POLICY message_read_status_insert ON message_read_status;
DROP POLICY message_read_status_select ON message_read_status;
ALTER TABLE message_read_status NO FORCE ROW LEVEL SECURITY;
ALTER TABLE message_read_status DISABLE ROW LEVEL SECURITY;

DROP POLICY messages_delete ON messages;
DROP POLICY messages_update ON messages;
DROP POLICY messages_insert ON messages;
DROP POLICY messages_select ON messages;
ALTER TABLE messages NO FORCE ROW LEVEL SECURITY;
ALTER TABLE messages DISABLE ROW LEVEL SECURITY;

DROP POLICY room_users_delete ON room_users;
DROP POLICY room_users_update ON room_users;
DROP POLICY room_users_insert ON room_users;
DROP POLICY room_users_select ON room_users;
ALTER TABLE room_users NO FORCE ROW LEVEL SECURITY;
ALTER TABLE room_users DISABLE ROW LEVEL SECURITY;

DROP POLICY rooms_delete ON rooms;
DROP POLICY rooms_update ON rooms;
DROP POLICY rooms_insert ON rooms;
DROP POLICY rooms_select ON rooms;
ALTER TABLE rooms NO FORCE ROW LEVEL SECURITY;
ALTER TABLE rooms DISABLE ROW LEVEL SECURITY;

DROP POLICY users_delete ON users;
DROP POLICY users_update ON users;
DROP POLICY users_insert ON users;
DROP POLICY users_select ON users;
ALTER TABLE users NO FORCE ROW LEVEL SECURITY;
ALTER TABLE users DISABLE ROW LEVEL SECURITY;

REVOKE ALL ON room_users FROM chatapp_rls;
DROP FUNCTION chatkeep_room_is_empty(uuid);
DROP FUNCTION chatkeep_acting_rooms(room_role);
DROP FUNCTION chatkeep_acting_user_id();
