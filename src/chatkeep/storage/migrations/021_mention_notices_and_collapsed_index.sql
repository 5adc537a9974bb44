-- Mention notices on the change feed, reply_to on the relay's read, and the collapsed
-- view's index (issue 14; docs/design.md, "Mention notices on the change feed").
--
-- A mention is a property of its message, not a change of its own: message.created and
-- message.edited changes carry the message's mentions as it is now (`mentions`: the
-- mentioned members' ids, sorted; `mentions_room`: an @room/@here/@all by an owner or
-- admin), read from message_mentions, which holds members only (015 resolves names
-- against the room's members and ignores anyone else), so a notice never names a
-- non-member. A separate 'mention' entry was weighed and not taken: each logged change has
-- exactly one event and one position (docs/design.md, "The change stream"), so it would
-- cost every mentioning send one more log row under the room lock, and a client would
-- have to pair it with its message anyway.
--
-- * chatkeep_changes (the catch-up read as a user, 013/015): the same columns, the
--   mentions in `data` of message rows (a rolling deploy's older nodes build message data
--   from the m_* columns and never read it: nothing changes for them).
-- * chatkeep_relay_changes (the outbox relay's system read, 012): now with m_reply_to and
--   the mentions, so what is read there is what changes() returns (its result type grows a
--   column: dropped and created again; no chatkeep code calls it between the two).
-- * chatkeep_sent_mentions: the live publish of a send reads its messages' mentions with
--   it (the send statement itself is unchanged), for each message only as its author, who
--   must still be a member of its room.
-- * messages_room_roots_idx: the collapsed view (roots only) walked the room's (room_id,
--   seq) index and skipped the replies in between, so a page behind a chatty thread read
--   every reply of it; this partial index holds the roots alone (docs/performance.md,
--   "The collapsed view").
--
-- No transaction: CREATE INDEX CONCURRENTLY refuses to run in one (see 016). Every
-- statement stands alone and is idempotent, so a run that failed part-way is rerun as is
-- (an INVALID index left by a failed build must be dropped first: docs/troubleshooting.md).
-- On Citus none of it applies (threads and mentions are not distributed yet, and replies
-- are refused there): the Citus part is empty and the Python side keeps today's reads.

-- chatkeep:no-transaction
-- chatkeep:up
-- chatkeep:plain-only
CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_room_roots_idx
    ON messages (room_id, seq) WHERE reply_to IS NULL;

CREATE OR REPLACE FUNCTION chatkeep_changes(acting uuid, room uuid, after_position bigint, max_rows integer)
RETURNS TABLE (
    head bigint, oldest bigint, "position" bigint, kind text, occurred_at timestamptz,
    actor_id uuid, message_id uuid, seq bigint, data jsonb, m_id uuid, m_user_id uuid,
    m_content text, m_type message_type, m_client_msg_id text, m_is_edited boolean,
    m_edited_at timestamptz, m_created_at timestamptz, m_reply_to uuid
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    RETURN QUERY
    SELECT h.head, h.oldest,
           c.position, c.kind, c.occurred_at, c.actor_id, c.message_id, c.seq,
           -- Only a message with an '@' can mention anyone: CASE probes those alone.
           CASE WHEN strpos(m.content, '@') > 0 THEN c.data || coalesce(
                    (SELECT jsonb_build_object(
                                'mentions', coalesce(jsonb_agg(mm.user_id ORDER BY mm.user_id)
                                                     FILTER (WHERE mm.user_id IS NOT NULL), '[]'),
                                'mentions_room', bool_or(mm.user_id IS NULL))
                       FROM message_mentions mm WHERE mm.message_id = m.id
                     HAVING count(*) > 0),
                    '{}') ELSE c.data END,
           m.id, m.user_id, m.content, m.type, m.client_msg_id, m.is_edited, m.edited_at,
           m.created_at, m.reply_to
      FROM (SELECT r.position AS head,
                   (SELECT min(x.position) FROM room_changes x WHERE x.room_id = chatkeep_changes.room)
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
             ON m.room_id = chatkeep_changes.room AND m.id = c.message_id AND c.kind IN ('message.created', 'message.edited')
     ORDER BY c.position;
END
$$;

-- squawk-ignore ban-drop-function
DROP FUNCTION IF EXISTS chatkeep_relay_changes(timestamptz, integer);

-- 012's system read, with the message's reply_to and mentions as changes() has them.
CREATE FUNCTION chatkeep_relay_changes(since timestamptz, max_rows integer)
RETURNS TABLE (
    room_id uuid, "position" bigint, kind text, occurred_at timestamptz, actor_id uuid,
    message_id uuid, seq bigint, data jsonb, m_id uuid, m_user_id uuid, m_content text,
    m_type message_type, m_client_msg_id text, m_is_edited boolean, m_edited_at timestamptz,
    m_created_at timestamptz, m_reply_to uuid
)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF nullif(current_setting('app.user_id', true), '') IS NOT NULL THEN
        RAISE EXCEPTION 'chatkeep_relay_changes() is system work: call it with no acting user'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY
    SELECT c.room_id, c.position, c.kind, c.occurred_at, c.actor_id, c.message_id, c.seq,
           -- Only a message with an '@' can mention anyone: CASE probes those alone.
           CASE WHEN strpos(m.content, '@') > 0 THEN c.data || coalesce(
                    (SELECT jsonb_build_object(
                                'mentions', coalesce(jsonb_agg(mm.user_id ORDER BY mm.user_id)
                                                     FILTER (WHERE mm.user_id IS NOT NULL), '[]'),
                                'mentions_room', bool_or(mm.user_id IS NULL))
                       FROM public.message_mentions mm WHERE mm.message_id = m.id
                     HAVING count(*) > 0),
                    '{}') ELSE c.data END,
           m.id, m.user_id, m.content, m.type, m.client_msg_id, m.is_edited,
           m.edited_at, m.created_at, m.reply_to
      FROM public.room_changes c
      LEFT JOIN public.messages m
             ON m.id = c.message_id AND c.kind IN ('message.created', 'message.edited')
     WHERE c.occurred_at >= since
     ORDER BY c.occurred_at, c.room_id, c.position
     LIMIT max_rows;
END
$$;
REVOKE EXECUTE ON FUNCTION chatkeep_relay_changes(timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_relay_changes(timestamptz, integer)
    TO chatapp_app, chatapp_owner, chatapp_readonly;

-- The mentions of messages just sent, for their message.created events: per (id, author)
-- pair, the message's mentions if that author wrote it and is still a member of its room
-- (what they would read of it under row security); messages without mentions are not
-- returned. Called outside a transaction, or acting as every one of the authors.
CREATE OR REPLACE FUNCTION chatkeep_sent_mentions(ids uuid[], authors uuid[])
RETURNS TABLE (message_id uuid, mentions uuid[], mentions_room boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acting uuid := nullif(current_setting('app.user_id', true), '')::uuid;
BEGIN
    IF coalesce(cardinality(ids), 0) <> coalesce(cardinality(authors), 0) THEN
        RAISE EXCEPTION 'chatkeep_sent_mentions: the arrays differ in length'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF acting IS NOT NULL AND EXISTS (SELECT 1 FROM unnest(authors) AS a
                                       WHERE a IS DISTINCT FROM acting) THEN
        RAISE EXCEPTION 'chatkeep_sent_mentions() reads only the acting user''s messages'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY
    SELECT m.id,
           coalesce(array_agg(mm.user_id ORDER BY mm.user_id)
                        FILTER (WHERE mm.user_id IS NOT NULL), '{}'::uuid[]),
           coalesce(bool_or(mm.user_id IS NULL), false)
      FROM unnest(ids, authors) AS s(id, author)
      JOIN public.messages m ON m.id = s.id AND m.user_id = s.author
      JOIN public.room_users ru ON ru.room_id = m.room_id AND ru.user_id = m.user_id
      JOIN public.message_mentions mm ON mm.message_id = m.id
     GROUP BY m.id;
END
$$;
REVOKE EXECUTE ON FUNCTION chatkeep_sent_mentions(uuid[], uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_sent_mentions(uuid[], uuid[]) TO chatapp_app, chatapp_owner;
-- chatkeep:end-plain-only

-- chatkeep:citus
-- Nothing on Citus: threads and mentions are not distributed yet (015), so there is no
-- mention to carry and no reply to skip; chatkeep reads the log there as before.

-- chatkeep:down
DROP FUNCTION IF EXISTS chatkeep_sent_mentions(uuid[], uuid[]);

-- squawk-ignore ban-drop-function
DROP FUNCTION IF EXISTS chatkeep_relay_changes(timestamptz, integer);

CREATE FUNCTION chatkeep_relay_changes(since timestamptz, max_rows integer)
RETURNS TABLE (
    room_id uuid, "position" bigint, kind text, occurred_at timestamptz, actor_id uuid,
    message_id uuid, seq bigint, data jsonb, m_id uuid, m_user_id uuid, m_content text,
    m_type message_type, m_client_msg_id text, m_is_edited boolean, m_edited_at timestamptz,
    m_created_at timestamptz
)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF nullif(current_setting('app.user_id', true), '') IS NOT NULL THEN
        RAISE EXCEPTION 'chatkeep_relay_changes() is system work: call it with no acting user'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY
    SELECT c.room_id, c.position, c.kind, c.occurred_at, c.actor_id, c.message_id, c.seq,
           c.data, m.id, m.user_id, m.content, m.type, m.client_msg_id, m.is_edited,
           m.edited_at, m.created_at
      FROM public.room_changes c
      LEFT JOIN public.messages m
             ON m.id = c.message_id AND c.kind IN ('message.created', 'message.edited')
     WHERE c.occurred_at >= since
     ORDER BY c.occurred_at, c.room_id, c.position
     LIMIT max_rows;
END
$$;
REVOKE EXECUTE ON FUNCTION chatkeep_relay_changes(timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_relay_changes(timestamptz, integer)
    TO chatapp_app, chatapp_owner, chatapp_readonly;

-- 015's catch-up read, without the mentions.
CREATE OR REPLACE FUNCTION chatkeep_changes(acting uuid, room uuid, after_position bigint, max_rows integer)
RETURNS TABLE (
    head bigint, oldest bigint, "position" bigint, kind text, occurred_at timestamptz,
    actor_id uuid, message_id uuid, seq bigint, data jsonb, m_id uuid, m_user_id uuid,
    m_content text, m_type message_type, m_client_msg_id text, m_is_edited boolean,
    m_edited_at timestamptz, m_created_at timestamptz, m_reply_to uuid
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
           m.created_at, m.reply_to
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

DROP INDEX CONCURRENTLY IF EXISTS messages_room_roots_idx;
