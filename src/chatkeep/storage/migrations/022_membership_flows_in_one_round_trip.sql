-- Membership flows in one round trip, with the room row locked first (issue 12).
--
-- join, leave / remove_member and change_role acting for a user paid BEGIN + set_config,
-- three to five statements, COMMIT: five to seven round trips, holding the room row lock
-- (taken by the change log's entry) across the COMMIT round trip. Each is now one
-- function, SECURITY INVOKER (so the row security policies bind it exactly as they bind
-- the statements the repository sent before), that sets the acting user with
-- chatkeep_act_as() (013) local to the statement's own transaction and makes the same
-- decisions in the same order (chatkeep.storage.rooms, RoomRepository.add_member,
-- remove_member, change_role).
--
-- Lock order: each locks the room row (FOR NO KEY UPDATE, the lock a send's seq trigger
-- and the change log's UPDATE take) before any membership row. A send locks the room row
-- and then its sender's membership row (the watermark), so the two now agree; before,
-- a membership change locked membership rows first and the room row last (its log
-- entry), and a member sending while removed or demoted, or an owner sending while
-- someone else's membership changed, could deadlock (40P01). Row security filters the
-- lock by rooms' update policy too (public rooms and the acting user's rooms): where it
-- hides a room the user can see, they are not a member of it and the flow refuses before
-- it writes.
--
-- Refusals raise nothing: they come back as an outcome, which the repository turns into
-- the error it raised before (same class, same text). Outcomes: 'done' (written; position
-- is its change's room position), 'existing' (join: already a member, unchanged),
-- 'not_member' (leave: nothing to remove; change_role: NotFound), 'no_room' (no room the
-- user can see), 'direct', 'archived', 'self_join', 'not_manager', 'owner_only',
-- 'rank' (an admin removing an admin or owner), 'last_owner'.

-- chatkeep:up
-- chatkeep:plain-only
CREATE FUNCTION chatkeep_join(acting uuid, room uuid, member uuid, new_role room_role)
RETURNS TABLE (
    outcome text, room_id uuid, user_id uuid, role room_role, joined_at timestamptz,
    last_read_at timestamptz, last_read_seq bigint, "position" bigint
)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = public, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    room_type room_type;
    active boolean;
    actor_role room_role;
BEGIN
    PERFORM chatkeep_act_as(acting);
    SELECT r.type, r.is_active INTO room_type, active FROM rooms r WHERE r.id = room;
    IF NOT FOUND THEN
        outcome := 'no_room';
        RETURN NEXT;
        RETURN;
    END IF;
    IF room_type = 'direct' THEN
        outcome := 'direct';
        RETURN NEXT;
        RETURN;
    END IF;
    PERFORM 1 FROM rooms r WHERE r.id = room FOR NO KEY UPDATE;
    IF NOT active THEN
        outcome := 'archived';
    ELSIF acting = member THEN
        IF room_type <> 'public' OR new_role <> 'member' THEN
            outcome := 'self_join';
        END IF;
    ELSE
        SELECT ru.role INTO actor_role FROM room_users ru
         WHERE ru.room_id = room AND ru.user_id = acting FOR SHARE;
        IF actor_role IS NULL OR actor_role NOT IN ('owner', 'admin') THEN
            outcome := 'not_manager';
        ELSIF new_role <> 'member' AND actor_role <> 'owner' THEN
            outcome := 'owner_only';
        END IF;
    END IF;
    IF outcome IS NOT NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;
    INSERT INTO room_users AS ru (room_id, user_id, role) VALUES (room, member, new_role)
    ON CONFLICT (room_id, user_id) DO NOTHING
    RETURNING ru.room_id, ru.user_id, ru.role, ru.joined_at, ru.last_read_at,
              ru.last_read_seq
         INTO room_id, user_id, role, joined_at, last_read_at, last_read_seq;
    IF FOUND THEN
        outcome := 'done';
        "position" := nullif(current_setting('chatkeep.position', true), '')::bigint;
    ELSE
        -- Already a member (possibly by a concurrent join that won the race).
        SELECT ru.room_id, ru.user_id, ru.role, ru.joined_at, ru.last_read_at,
               ru.last_read_seq
          INTO room_id, user_id, role, joined_at, last_read_at, last_read_seq
          FROM room_users ru WHERE ru.room_id = room AND ru.user_id = member;
        outcome := CASE WHEN FOUND THEN 'existing' ELSE 'not_member' END;
    END IF;
    RETURN NEXT;
END
$$;

-- The owner rows plus the actor's and the target's, locked in user id order after the
-- room row: who decides, and whether the room keeps an owner.
CREATE FUNCTION chatkeep_remove_member(acting uuid, room uuid, member uuid)
RETURNS TABLE (outcome text, "position" bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = public, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    room_type room_type;
    actor_role room_role;
    target room_role;
    owners integer := 0;
    locked record;
BEGIN
    PERFORM chatkeep_act_as(acting);
    SELECT r.type INTO room_type FROM rooms r WHERE r.id = room;
    IF NOT FOUND THEN
        outcome := 'no_room';
        RETURN NEXT;
        RETURN;
    END IF;
    IF room_type = 'direct' THEN
        outcome := 'direct';
        RETURN NEXT;
        RETURN;
    END IF;
    PERFORM 1 FROM rooms r WHERE r.id = room FOR NO KEY UPDATE;
    FOR locked IN
        SELECT ru.user_id, ru.role FROM room_users ru
         WHERE ru.room_id = room AND (ru.role = 'owner' OR ru.user_id IN (acting, member))
         ORDER BY ru.user_id
           FOR UPDATE
    LOOP
        IF locked.role = 'owner' THEN
            owners := owners + 1;
        END IF;
        IF locked.user_id = acting THEN
            actor_role := locked.role;
        END IF;
        IF locked.user_id = member THEN
            target := locked.role;
        END IF;
    END LOOP;
    -- The actor's right first: to someone outside the room every target would look like
    -- a non-member.
    IF acting <> member AND (actor_role IS NULL OR actor_role NOT IN ('owner', 'admin')) THEN
        outcome := 'not_manager';
    ELSIF target IS NULL THEN
        outcome := 'not_member';
    ELSIF acting <> member AND actor_role <> 'owner' AND target <> 'member' THEN
        outcome := 'rank';
    ELSIF target = 'owner' AND owners <= 1 THEN
        outcome := 'last_owner';
    ELSE
        DELETE FROM room_users ru WHERE ru.room_id = room AND ru.user_id = member;
        outcome := 'done';
        "position" := nullif(current_setting('chatkeep.position', true), '')::bigint;
    END IF;
    RETURN NEXT;
END
$$;

CREATE FUNCTION chatkeep_change_role(acting uuid, room uuid, member uuid, new_role room_role)
RETURNS TABLE (
    outcome text, room_id uuid, user_id uuid, role room_role, joined_at timestamptz,
    last_read_at timestamptz, last_read_seq bigint, "position" bigint
)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = public, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    room_type room_type;
    actor_role room_role;
    target room_role;
    owners integer := 0;
    locked record;
BEGIN
    PERFORM chatkeep_act_as(acting);
    SELECT r.type INTO room_type FROM rooms r WHERE r.id = room;
    IF NOT FOUND THEN
        outcome := 'no_room';
        RETURN NEXT;
        RETURN;
    END IF;
    IF room_type = 'direct' THEN
        outcome := 'direct';
        RETURN NEXT;
        RETURN;
    END IF;
    PERFORM 1 FROM rooms r WHERE r.id = room FOR NO KEY UPDATE;
    FOR locked IN
        SELECT ru.user_id, ru.role FROM room_users ru
         WHERE ru.room_id = room AND (ru.role = 'owner' OR ru.user_id IN (acting, member))
         ORDER BY ru.user_id
           FOR UPDATE
    LOOP
        IF locked.role = 'owner' THEN
            owners := owners + 1;
        END IF;
        IF locked.user_id = acting THEN
            actor_role := locked.role;
        END IF;
        IF locked.user_id = member THEN
            target := locked.role;
        END IF;
    END LOOP;
    IF actor_role IS NULL OR actor_role NOT IN ('owner', 'admin') THEN
        outcome := 'not_manager';
    ELSIF target IS NULL THEN
        outcome := 'not_member';
    ELSIF actor_role <> 'owner' AND 'owner' IN (target, new_role) THEN
        outcome := 'owner_only';
    ELSIF target = 'owner' AND new_role <> 'owner' AND owners <= 1 THEN
        outcome := 'last_owner';
    ELSE
        UPDATE room_users ru SET role = new_role
         WHERE ru.room_id = room AND ru.user_id = member
        RETURNING ru.room_id, ru.user_id, ru.role, ru.joined_at, ru.last_read_at,
                  ru.last_read_seq
             INTO room_id, user_id, role, joined_at, last_read_at, last_read_seq;
        outcome := 'done';
        "position" := nullif(current_setting('chatkeep.position', true), '')::bigint;
    END IF;
    RETURN NEXT;
END
$$;

REVOKE EXECUTE ON FUNCTION chatkeep_join(uuid, uuid, uuid, room_role) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_remove_member(uuid, uuid, uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_change_role(uuid, uuid, uuid, room_role) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_join(uuid, uuid, uuid, room_role)
    TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_remove_member(uuid, uuid, uuid) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_change_role(uuid, uuid, uuid, room_role)
    TO chatapp_app, chatapp_owner;
-- chatkeep:end-plain-only

-- chatkeep:citus
-- On Citus a function's set_config never reaches the workers: membership changes there
-- stay transactions acting as the user (RoomRepository's statements, which lock the room
-- row first too). Nothing of this migration applies.

-- chatkeep:down
-- IF EXISTS: on Citus the up part made none of them.
DROP FUNCTION IF EXISTS chatkeep_change_role(uuid, uuid, uuid, room_role);
DROP FUNCTION IF EXISTS chatkeep_remove_member(uuid, uuid, uuid);
DROP FUNCTION IF EXISTS chatkeep_join(uuid, uuid, uuid, room_role);
