-- Flows in one round trip, and policies whose membership test does not grow with the user.
--
-- 1. Policies that cost little (issue 12, item 2). Until now every policy tested
--    membership with `room_id = ANY (chatkeep_acting_rooms('member'))`: the user's rooms
--    built as an array once per statement, then scanned linearly for each row filtered.
--    A user in 1,000 rooms paid 1,000 comparisons per row (unread counts 15 ms, the room
--    list 230 ms on the benchmark's fixture). The hashed form `IN (SELECT unnest(...))`
--    was measured and not shipped: at 200,000 rooms the planner then seq-scanned rooms.
--    Now each row is tested with an EXISTS probe of chatkeep_acting_memberships, a view of
--    the acting user's own room_users rows: one look-up of room_users (user_id, room_id)
--    per row, whatever the number of rooms, and the user's memberships still drive the
--    plan (no seq scan of rooms at 200,000 rooms: docs/performance.md has the figures).
--    The view is owned by chatapp_rls (NOLOGIN, BYPASSRLS, owns nothing else), so the
--    room_users it reads is not filtered again: no recursion between the policies of
--    rooms and room_users, which read each other. It shows the acting user's own rows
--    only (which room_users_select shows them anyway); security_barrier keeps a caller's
--    own conditions from running before its WHERE; uuid equality is leakproof, so the
--    probe's `room_id = <the row's room>` still reaches the index.
--    messages' probes carry OFFSET 0: without it the planner may hash every room of the
--    user to filter a history page (it sizes the choice by the rows the index range holds,
--    not the LIMIT), which costs a user in 1,000 rooms a look-up of all 1,000 rooms for a
--    page of 50. Every messages statement reads rooms' pages, so one probe per row is
--    always the cheaper shape there. rooms and room_users let the planner choose (hashed
--    for a statement over all of a user's rooms, per row otherwise).
--    Tests at the admin and owner levels stay on chatkeep_acting_rooms(): they check the
--    one row a user writes, never a scan, and so does the guard trigger.
--
-- 2. Flows in one round trip (issue 12, item 1). A facade flow acting for a user paid
--    BEGIN + set_config, the statement, COMMIT: three round trips. Each read flow is now one
--    function, SECURITY INVOKER (so the real policies bind it as the caller), that sets the
--    acting user with set_config(..., true) through chatkeep_act_as(): local to the
--    statement's own implicit transaction, so it ends with the statement and never reaches
--    the next borrower of the connection. chatkeep_act_as() refuses to change a user that
--    the transaction already acts as (a caller's open transaction acting as someone else).
--    Database.fetch_as() calls them (docs/design.md, "Flows in one round trip").

-- chatkeep:up
-- The acting user's memberships: the policies' probe (see above).
CREATE VIEW chatkeep_acting_memberships WITH (security_barrier) AS
SELECT ru.room_id, ru.role
  FROM public.room_users ru
 WHERE ru.user_id = (SELECT public.chatkeep_acting_user_id());

COMMENT ON VIEW chatkeep_acting_memberships IS
    'The acting user''s memberships (room_id, role): the policies'' membership probe';

GRANT CREATE ON SCHEMA public TO chatapp_rls;
ALTER VIEW chatkeep_acting_memberships OWNER TO chatapp_rls;
REVOKE CREATE ON SCHEMA public FROM chatapp_rls;
REVOKE ALL ON chatkeep_acting_memberships FROM PUBLIC;
GRANT SELECT ON chatkeep_acting_memberships TO chatapp_app;

-- Every membership test of the policies that filters rows (the 'member' level): from
-- `room_id = ANY (<the user's rooms as an array>)`, a linear scan of the array per row,
-- to an EXISTS probe of the view per row. Tests at the admin and owner levels stay on
-- chatkeep_acting_rooms(): they check one row that a user writes, never a scan.
ALTER POLICY rooms_select ON rooms
    USING (
        type = 'public'
        OR EXISTS (SELECT 1 FROM chatkeep_acting_memberships am WHERE am.room_id = rooms.id)
        OR created_by = (SELECT chatkeep_acting_user_id())
        OR direct_user_low = (SELECT chatkeep_acting_user_id())
        OR direct_user_high = (SELECT chatkeep_acting_user_id())
    );
ALTER POLICY rooms_update ON rooms
    USING (
        type = 'public'
        OR EXISTS (SELECT 1 FROM chatkeep_acting_memberships am WHERE am.room_id = rooms.id)
    )
    WITH CHECK (
        EXISTS (SELECT 1 FROM chatkeep_acting_memberships am WHERE am.room_id = rooms.id)
    );
ALTER POLICY rooms_delete ON rooms
    USING (
        type = 'public'
        OR EXISTS (SELECT 1 FROM chatkeep_acting_memberships am WHERE am.room_id = rooms.id)
    );

ALTER POLICY room_users_select ON room_users
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                    WHERE am.room_id = room_users.room_id)
    );
ALTER POLICY room_users_update ON room_users
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                    WHERE am.room_id = room_users.room_id)
    );
ALTER POLICY room_users_delete ON room_users
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                    WHERE am.room_id = room_users.room_id)
    );

ALTER POLICY messages_select ON messages
    USING (EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                    WHERE am.room_id = messages.room_id OFFSET 0));
ALTER POLICY messages_insert ON messages
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                     WHERE am.room_id = messages.room_id OFFSET 0)
    );
ALTER POLICY messages_update ON messages
    USING (EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                    WHERE am.room_id = messages.room_id OFFSET 0))
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                     WHERE am.room_id = messages.room_id OFFSET 0)
    );
ALTER POLICY messages_delete ON messages
    USING (EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                    WHERE am.room_id = messages.room_id OFFSET 0));

ALTER POLICY room_changes_select ON room_changes
    USING (EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                    WHERE am.room_id = room_changes.room_id));

ALTER POLICY message_reactions_select ON message_reactions
    USING (EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                    WHERE am.room_id = message_reactions.room_id));
ALTER POLICY message_reactions_insert ON message_reactions
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                     WHERE am.room_id = message_reactions.room_id)
    );
ALTER POLICY message_reactions_delete ON message_reactions
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        AND EXISTS (SELECT 1 FROM chatkeep_acting_memberships am
                     WHERE am.room_id = message_reactions.room_id)
    );

-- The acting user of this statement's transaction: set it, or check it is already it.
CREATE FUNCTION chatkeep_act_as(acting uuid) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    current_user_id uuid := nullif(current_setting('app.user_id', true), '')::uuid;
BEGIN
    IF acting IS NULL THEN
        RAISE EXCEPTION 'an acting user is required'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF current_user_id IS NOT NULL AND current_user_id <> acting THEN
        RAISE EXCEPTION 'this transaction already acts as another user'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM set_config('app.user_id', acting::text, true);
END
$$;

-- A page of a room's history with authors and reaction counts, ascending seq: the rows
-- older than `pivot` (at most `older`, newest first before the sort) and the rows from
-- `pivot` on (at most `newer`). before: (s, n, 0); after: (s + 1, 0, n); around: both.
-- A LIMIT of 0 reads nothing. The shape and its reasons: messages.py, HISTORY_*.
CREATE FUNCTION chatkeep_history(
    acting uuid, room uuid, pivot bigint, older integer, newer integer
) RETURNS TABLE (
    id uuid, room_id uuid, user_id uuid, seq bigint, client_msg_id text, content text,
    type message_type, is_edited boolean, edited_at timestamptz, created_at timestamptz,
    username text, avatar_url text, emoji text[], n bigint[], me boolean[]
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    RETURN QUERY
    SELECT m.id, m.room_id, m.user_id, m.seq, m.client_msg_id, m.content, m.type,
           m.is_edited, m.edited_at, m.created_at, u.username, u.avatar_url,
           rx.emoji, rx.n, rx.me
      FROM ((SELECT x.id, x.room_id, x.user_id, x.seq, x.client_msg_id, x.content, x.type,
                    x.is_edited, x.edited_at, x.created_at
               FROM messages x
              WHERE x.room_id = chatkeep_history.room AND x.seq < chatkeep_history.pivot
              ORDER BY x.seq DESC LIMIT chatkeep_history.older)
            UNION ALL
            (SELECT x.id, x.room_id, x.user_id, x.seq, x.client_msg_id, x.content, x.type,
                    x.is_edited, x.edited_at, x.created_at
               FROM messages x
              WHERE x.room_id = chatkeep_history.room AND x.seq >= chatkeep_history.pivot
              ORDER BY x.seq ASC LIMIT chatkeep_history.newer)) AS m
      JOIN users u ON u.id = m.user_id
      LEFT JOIN LATERAL (
            SELECT array_agg(g.emoji ORDER BY g.first, g.emoji) AS emoji,
                   array_agg(g.n ORDER BY g.first, g.emoji) AS n,
                   array_agg(g.me ORDER BY g.first, g.emoji) AS me
              FROM (SELECT r.emoji, count(*) AS n, min(r.created_at) AS first,
                           coalesce(bool_or(r.user_id = chatkeep_history.acting), false) AS me
                      FROM message_reactions r
                     WHERE r.message_id = m.id
                     GROUP BY r.emoji) AS g
           ) AS rx ON true
     ORDER BY m.seq;
END
$$;

-- Move the acting user's read watermark (messages.py, MARK_READ). No row: `room_visible`
-- says whether the room exists for them (not a member), in the same round trip.
CREATE FUNCTION chatkeep_mark_read(acting uuid, room uuid, upto bigint)
RETURNS TABLE (watermark bigint, room_visible boolean)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    UPDATE room_users ru
       SET last_read_seq = GREATEST(ru.last_read_seq, target.seq),
           last_read_at = CASE WHEN target.seq > ru.last_read_seq THEN now()
                               ELSE ru.last_read_at END
      FROM rooms r,
           LATERAL (SELECT LEAST(COALESCE(chatkeep_mark_read.upto, r.last_seq), r.last_seq)
                           AS seq) AS target
     WHERE ru.room_id = chatkeep_mark_read.room AND ru.user_id = acting AND r.id = ru.room_id
    RETURNING ru.last_read_seq INTO watermark;
    room_visible := watermark IS NOT NULL
        OR EXISTS (SELECT 1 FROM rooms r WHERE r.id = chatkeep_mark_read.room);
    RETURN NEXT;
END
$$;

-- The acting user's rooms with last message and unread count (rooms.py, ROOMS_OF).
CREATE FUNCTION chatkeep_rooms_of(acting uuid, include_inactive boolean)
RETURNS TABLE (
    id uuid, name text, description text, type room_type, created_by uuid,
    is_active boolean, last_seq bigint, created_at timestamptz, updated_at timestamptz,
    role room_role, last_read_seq bigint, unread_count bigint,
    m_id uuid, m_user_id uuid, m_seq bigint, m_client_msg_id text, m_content text,
    m_type message_type, m_is_edited boolean, m_edited_at timestamptz,
    m_created_at timestamptz, m_username text, m_avatar_url text
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    RETURN QUERY
    SELECT r.id, r.name, r.description, r.type, r.created_by, r.is_active, r.last_seq,
           r.created_at, r.updated_at, ru.role, ru.last_read_seq,
           GREATEST(r.last_seq - ru.last_read_seq, 0),
           m.id, m.user_id, m.seq, m.client_msg_id, m.content, m.type, m.is_edited,
           m.edited_at, m.created_at, u.username, u.avatar_url
      FROM room_users ru
      JOIN rooms r ON r.id = ru.room_id
      LEFT JOIN LATERAL (
            SELECT mm.id, mm.user_id, mm.seq, mm.client_msg_id, mm.content, mm.type,
                   mm.is_edited, mm.edited_at, mm.created_at
              FROM messages mm
             WHERE mm.room_id = r.id
             ORDER BY mm.seq DESC
             LIMIT 1
           ) m ON true
      LEFT JOIN users u ON u.id = m.user_id
     WHERE ru.user_id = acting AND (r.is_active OR chatkeep_rooms_of.include_inactive)
     ORDER BY COALESCE(m.created_at, r.created_at) DESC, r.id;
END
$$;

-- A page of a room's change log after `after_position` (changes.py, CHANGES).
CREATE FUNCTION chatkeep_changes(acting uuid, room uuid, after_position bigint, max_rows integer)
RETURNS TABLE (
    head bigint, oldest bigint, "position" bigint, kind text, occurred_at timestamptz,
    actor_id uuid, message_id uuid, seq bigint, data jsonb, m_id uuid, m_user_id uuid,
    m_content text, m_type message_type, m_client_msg_id text, m_is_edited boolean,
    m_edited_at timestamptz, m_created_at timestamptz
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    RETURN QUERY
    SELECT h.head, h.oldest,
           c.position, c.kind, c.occurred_at, c.actor_id, c.message_id, c.seq, c.data,
           m.id, m.user_id, m.content, m.type, m.client_msg_id, m.is_edited, m.edited_at,
           m.created_at
      FROM (SELECT r.position AS head,
                   (SELECT min(x.position) FROM room_changes x WHERE x.room_id = r.id)
                       AS oldest
              FROM rooms r WHERE r.id = chatkeep_changes.room) AS h
      LEFT JOIN LATERAL (
            SELECT * FROM room_changes c
             WHERE c.room_id = chatkeep_changes.room
               AND c.position > chatkeep_changes.after_position AND c.position <= h.head
             ORDER BY c.position
             LIMIT chatkeep_changes.max_rows
           ) AS c ON true
      LEFT JOIN messages m
             ON m.id = c.message_id AND c.kind IN ('message.created', 'message.edited')
     ORDER BY c.position;
END
$$;

-- The room's position, as the acting user (NULL: no such room for them).
CREATE FUNCTION chatkeep_room_position(acting uuid, room uuid) RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM chatkeep_act_as(acting);
    RETURN (SELECT r.position FROM rooms r WHERE r.id = room);
END
$$;

REVOKE EXECUTE ON FUNCTION chatkeep_act_as(uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_history(uuid, uuid, bigint, integer, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_mark_read(uuid, uuid, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_rooms_of(uuid, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_changes(uuid, uuid, bigint, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_room_position(uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_act_as(uuid) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_history(uuid, uuid, bigint, integer, integer)
    TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_mark_read(uuid, uuid, bigint) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_rooms_of(uuid, boolean) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_changes(uuid, uuid, bigint, integer)
    TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_room_position(uuid, uuid) TO chatapp_app, chatapp_owner;

-- chatkeep:down
DROP FUNCTION chatkeep_room_position(uuid, uuid);
DROP FUNCTION chatkeep_changes(uuid, uuid, bigint, integer);
DROP FUNCTION chatkeep_rooms_of(uuid, boolean);
DROP FUNCTION chatkeep_mark_read(uuid, uuid, bigint);
DROP FUNCTION chatkeep_history(uuid, uuid, bigint, integer, integer);
DROP FUNCTION chatkeep_act_as(uuid);

ALTER POLICY message_reactions_delete ON message_reactions
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
ALTER POLICY message_reactions_insert ON message_reactions
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
ALTER POLICY message_reactions_select ON message_reactions
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));

ALTER POLICY room_changes_select ON room_changes
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));

ALTER POLICY messages_delete ON messages
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));
ALTER POLICY messages_update ON messages
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]))
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
ALTER POLICY messages_insert ON messages
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
ALTER POLICY messages_select ON messages
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));

ALTER POLICY room_users_delete ON room_users
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
ALTER POLICY room_users_update ON room_users
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
ALTER POLICY room_users_select ON room_users
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );

ALTER POLICY rooms_delete ON rooms
    USING (
        type = 'public'
        OR id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
ALTER POLICY rooms_update ON rooms
    USING (
        type = 'public'
        OR id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    )
    WITH CHECK (id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));
ALTER POLICY rooms_select ON rooms
    USING (
        type = 'public'
        OR id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
        OR created_by = (SELECT chatkeep_acting_user_id())
        OR direct_user_low = (SELECT chatkeep_acting_user_id())
        OR direct_user_high = (SELECT chatkeep_acting_user_id())
    );

DROP VIEW chatkeep_acting_memberships;
