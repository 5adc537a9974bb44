-- Least privilege, tightened: chatapp_app keeps only the writes the repositories' SQL makes
-- (docs/security.md has the table). 008 granted more than the flows need, and row security
-- cannot take it back, since it filters rows, not columns:
--
-- * rooms.last_seq was writable by hand, so a member could move the counter and leave gaps
--   in seq. It now moves only in chatkeep_assign_message_seq(), the BEFORE INSERT trigger on
--   messages, made SECURITY DEFINER (owned by chatapp_owner): the counter moves exactly when
--   a message takes the seq, in the same statement, under the room row lock. The app may no
--   longer insert messages.seq itself, so every message it writes goes through the trigger.
-- * INSERT is column-precise too: no row starts with a counter, a read watermark, an edit
--   flag or a timestamp of the caller's choosing.
-- * Columns no flow writes lose UPDATE: users.email and updated_at, rooms.type, is_active
--   and updated_at (the triggers keep updated_at), messages.type, message_read_status (no
--   flow updates or deletes a receipt; cascades run as the owner).
-- * chatkeep_room_is_empty(room) answered for any room id; it now answers (true/false) only
--   for a room the acting user created, the one case the room_users insert policy asks it
--   about, and NULL (which a policy reads as "no") for every other room.
-- * Tables later migrations create no longer start with the app's DML: each migration
--   grants what its flows need, next to the table's policies.

-- chatkeep:up

-- As the definer, the trigger sees every room, so it first does for the application role
-- what row security did when the role moved the counter itself: only a member of the room
-- takes a seq (and locks the room's row); for anyone else a public room is refused and any
-- other room does not exist, so an outsider learns nothing of a private room and cannot
-- lock its row. System work (the owner's members, superusers) is not checked, as in
-- chatkeep_guard(); session_user, since current_user is the definer here.
CREATE OR REPLACE FUNCTION chatkeep_assign_message_seq() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acting uuid := nullif(current_setting('app.user_id', true), '')::uuid;
BEGIN
    IF NEW.seq IS NULL THEN
        IF NOT pg_has_role(session_user, 'chatapp_owner', 'MEMBER')
           AND NOT EXISTS (SELECT 1 FROM public.room_users ru
                            WHERE ru.room_id = NEW.room_id AND ru.user_id = acting) THEN
            IF EXISTS (SELECT 1 FROM public.rooms r
                        WHERE r.id = NEW.room_id AND r.type = 'public') THEN
                RAISE EXCEPTION 'new row violates row-level security policy for table "messages"'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            RAISE EXCEPTION 'room % does not exist', NEW.room_id
                USING ERRCODE = 'foreign_key_violation',
                      CONSTRAINT = 'messages_room_id_fkey',
                      TABLE = 'messages';
        END IF;
        UPDATE public.rooms SET last_seq = last_seq + 1
         WHERE id = NEW.room_id
        RETURNING last_seq INTO NEW.seq;
        IF NEW.seq IS NULL THEN
            -- Report it as the foreign key would, rather than as a NULL seq.
            RAISE EXCEPTION 'room % does not exist', NEW.room_id
                USING ERRCODE = 'foreign_key_violation',
                      CONSTRAINT = 'messages_room_id_fkey',
                      TABLE = 'messages';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

-- A trigger function cannot be called directly; EXECUTE is not even checked when it fires.
REVOKE EXECUTE ON FUNCTION chatkeep_assign_message_seq() FROM PUBLIC;

CREATE OR REPLACE FUNCTION chatkeep_room_is_empty(room uuid) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.rooms r
                    WHERE r.id = room
                      AND r.created_by = nullif(current_setting('app.user_id', true), '')::uuid)
    THEN
        RETURN NULL;
    END IF;
    RETURN NOT EXISTS (SELECT 1 FROM public.room_users ru WHERE ru.room_id = room);
END
$$;

GRANT SELECT (id, created_by) ON rooms TO chatapp_rls;

-- INSERT: the table-wide grant goes (with it, any column grant), then the columns come back.
REVOKE INSERT ON users, rooms, room_users, messages, message_read_status FROM chatapp_app;
GRANT INSERT (id, email, password_hash, username, avatar_url) ON users TO chatapp_app;
GRANT INSERT (id, name, description, type, created_by, direct_user_low, direct_user_high)
    ON rooms TO chatapp_app;
GRANT INSERT (room_id, user_id, role) ON room_users TO chatapp_app;
GRANT INSERT (id, room_id, user_id, client_msg_id, content, type) ON messages TO chatapp_app;
GRANT INSERT (message_id, user_id) ON message_read_status TO chatapp_app;

REVOKE UPDATE (email, updated_at) ON users FROM chatapp_app;
REVOKE UPDATE (type, is_active, last_seq, updated_at) ON rooms FROM chatapp_app;
REVOKE UPDATE (type) ON messages FROM chatapp_app;
REVOKE UPDATE (read_at) ON message_read_status FROM chatapp_app;
REVOKE DELETE ON message_read_status FROM chatapp_app;

ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    REVOKE SELECT, INSERT, UPDATE, DELETE ON TABLES FROM chatapp_app;
ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    REVOKE USAGE, SELECT ON SEQUENCES FROM chatapp_app;

-- chatkeep:down
ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO chatapp_app;
ALTER DEFAULT PRIVILEGES FOR ROLE chatapp_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO chatapp_app;

GRANT DELETE ON message_read_status TO chatapp_app;
GRANT UPDATE (read_at) ON message_read_status TO chatapp_app;
GRANT UPDATE (type) ON messages TO chatapp_app;
GRANT UPDATE (type, is_active, last_seq, updated_at) ON rooms TO chatapp_app;
GRANT UPDATE (email, updated_at) ON users TO chatapp_app;

REVOKE INSERT ON users, rooms, room_users, messages, message_read_status FROM chatapp_app;
GRANT INSERT ON users, rooms, room_users, messages, message_read_status TO chatapp_app;

REVOKE SELECT (id, created_by) ON rooms FROM chatapp_rls;

CREATE OR REPLACE FUNCTION chatkeep_room_is_empty(room uuid) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN NOT EXISTS (SELECT 1 FROM public.room_users ru WHERE ru.room_id = room);
END
$$;

GRANT EXECUTE ON FUNCTION chatkeep_assign_message_seq() TO PUBLIC;
CREATE OR REPLACE FUNCTION chatkeep_assign_message_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq IS NULL THEN
        UPDATE rooms SET last_seq = last_seq + 1
         WHERE id = NEW.room_id
        RETURNING last_seq INTO NEW.seq;
        IF NEW.seq IS NULL THEN
            -- Report it as the foreign key would, rather than as a NULL seq.
            RAISE EXCEPTION 'room % does not exist', NEW.room_id
                USING ERRCODE = 'foreign_key_violation',
                      CONSTRAINT = 'messages_room_id_fkey',
                      TABLE = 'messages';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
