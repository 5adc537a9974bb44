-- History reads without replanning, that prove membership themselves (issue 12, reads).
--
-- 1. chatkeep_history (013/015) is plpgsql: its RETURN QUERY is a cached plan of the
--    session, and with its parameters (the LIMITs among them) the plan cache kept choosing
--    a custom plan, so every call planned the page again under the policies (about 1-3 ms
--    of server time on the benchmark's machine against 0.3-0.5 ms for the execution; a
--    2,000-call loop as chatapp_app: 3-4 s against 0.9-2 s with a generic plan,
--    docs/performance.md). chatkeep_history_page is the same page with
--    `plan_cache_mode = force_generic_plan` for its own statements: planned once per
--    session. The generic plan's shape does not depend on the values: each half of the
--    page is a range of messages (room_id, seq), the policies' membership probe an
--    index-only look-up per row.
--    The page's reaction counts are read in one scan for all its messages
--    (`message_id = ANY (<the page's ids>)`, the primary key's prefix) where 015 ran a
--    look-up and an aggregate per message: the same arrays, in the same order, about a
--    third less time per page in a loop of 1,000 calls (docs/performance.md).
--    The SET clause restores plan_cache_mode when the call ends; the acting user is set
--    as by chatkeep_history (chatkeep_act_as: local to the statement's transaction).
--
-- 2. It returns rows only when the acting user is a member of the room (one look-up of
--    room_users, a one-time filter), whatever the role: under chatapp_app the policies
--    already hide the rows of other rooms, and this holds for a connection the policies do
--    not bind too. So a page with rows proves membership, and the facade asks Redis
--    whether the user is a member only when the page is empty (to tell "not a member" and
--    "no such room" from an empty page): history and catch-up cost one round trip,
--    whatever the room's size.
--
-- 3. chatkeep_history_around: the page around a message id in one round trip (the
--    message's seq read in the same call, as the acting user), where the facade paid a
--    transaction (BEGIN + set_config, the look-up, the page, COMMIT) before. No row: the
--    message is not in the room, or the user may not see it.
--
-- PostgreSQL only: on Citus the repositories keep 015's chatkeep_history inside a
-- transaction acting as the user (Citus passes the user to its workers only from a SET
-- LOCAL) and the facade its membership check first, so the Citus part is empty.

-- chatkeep:up
-- chatkeep:plain-only
CREATE FUNCTION chatkeep_history_page(
    acting uuid, room uuid, pivot bigint, older integer, newer integer
) RETURNS TABLE (
    id uuid, room_id uuid, user_id uuid, seq bigint, client_msg_id text, content text,
    type message_type, is_edited boolean, edited_at timestamptz, created_at timestamptz,
    reply_to uuid, username text, avatar_url text, emoji text[], n bigint[], me boolean[]
)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    RETURN QUERY
    WITH page AS MATERIALIZED (
           (SELECT x.id, x.room_id, x.user_id, x.seq, x.client_msg_id, x.content, x.type,
                   x.is_edited, x.edited_at, x.created_at, x.reply_to
              FROM messages x
             WHERE x.room_id = chatkeep_history_page.room
               AND x.seq < chatkeep_history_page.pivot
             ORDER BY x.seq DESC LIMIT chatkeep_history_page.older)
           UNION ALL
           (SELECT x.id, x.room_id, x.user_id, x.seq, x.client_msg_id, x.content, x.type,
                   x.is_edited, x.edited_at, x.created_at, x.reply_to
              FROM messages x
             WHERE x.room_id = chatkeep_history_page.room
               AND x.seq >= chatkeep_history_page.pivot
             ORDER BY x.seq ASC LIMIT chatkeep_history_page.newer))
    SELECT m.id, m.room_id, m.user_id, m.seq, m.client_msg_id, m.content, m.type,
           m.is_edited, m.edited_at, m.created_at, m.reply_to, u.username, u.avatar_url,
           rx.emoji, rx.n, rx.me
      FROM page m
      JOIN users u ON u.id = m.user_id
      LEFT JOIN (
            SELECT g.message_id,
                   array_agg(g.emoji ORDER BY g.first, g.emoji) AS emoji,
                   array_agg(g.n ORDER BY g.first, g.emoji) AS n,
                   array_agg(g.me ORDER BY g.first, g.emoji) AS me
              FROM (SELECT r.message_id, r.emoji, count(*) AS n, min(r.created_at) AS first,
                           coalesce(bool_or(r.user_id = chatkeep_history_page.acting), false)
                               AS me
                      FROM message_reactions r
                     WHERE r.message_id = ANY (ARRAY(SELECT p.id FROM page p))
                     GROUP BY r.message_id, r.emoji) AS g
             GROUP BY g.message_id
           ) AS rx ON rx.message_id = m.id
     WHERE EXISTS (SELECT 1 FROM room_users ru
                    WHERE ru.room_id = chatkeep_history_page.room
                      AND ru.user_id = chatkeep_history_page.acting)
     ORDER BY m.seq;
END
$$;

CREATE FUNCTION chatkeep_history_around(
    acting uuid, room uuid, anchor uuid, older integer, newer integer
) RETURNS TABLE (
    id uuid, room_id uuid, user_id uuid, seq bigint, client_msg_id text, content text,
    type message_type, is_edited boolean, edited_at timestamptz, created_at timestamptz,
    reply_to uuid, username text, avatar_url text, emoji text[], n bigint[], me boolean[]
)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    pivot bigint;
BEGIN
    PERFORM chatkeep_act_as(acting);
    SELECT x.seq INTO pivot
      FROM messages x
     WHERE x.id = chatkeep_history_around.anchor AND x.room_id = chatkeep_history_around.room;
    IF pivot IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    SELECT * FROM chatkeep_history_page(acting, room, pivot, older, newer);
END
$$;

COMMENT ON FUNCTION chatkeep_history_page(uuid, uuid, bigint, integer, integer) IS
    'A page of a room''s history as the acting user, for members only, planned once';
COMMENT ON FUNCTION chatkeep_history_around(uuid, uuid, uuid, integer, integer) IS
    'The page of a room''s history around a message id, as the acting user, in one call';

REVOKE EXECUTE ON FUNCTION chatkeep_history_page(uuid, uuid, bigint, integer, integer)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_history_around(uuid, uuid, uuid, integer, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_history_page(uuid, uuid, bigint, integer, integer)
    TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_history_around(uuid, uuid, uuid, integer, integer)
    TO chatapp_app, chatapp_owner;
-- chatkeep:end-plain-only

-- chatkeep:citus
-- Nothing on Citus: the region above is skipped there, and chatkeep keeps 015's
-- chatkeep_history in a transaction acting as the user (see the top of this file).

-- chatkeep:down
DROP FUNCTION IF EXISTS chatkeep_history_around(uuid, uuid, uuid, integer, integer);
DROP FUNCTION IF EXISTS chatkeep_history_page(uuid, uuid, bigint, integer, integer);
