-- Threads, mentions and unread badges (issue 14).
--
-- Threads are one level deep: messages.reply_to names the thread's root, a message of the
-- same room; a reply to a reply attaches to that reply's root. Replies are ordinary
-- messages of the room (they take the room's next seq and appear in its timeline, so
-- unread counts stay a subtraction); the collapsed view filters them out.
--
-- Everything is kept by triggers on messages, so the only change to the send statement is
-- the reply_to value, and no path (a repository, group commit, a hand-written statement)
-- can store a reply or a mention without its thread state:
--
-- * threads: one row per root with replies: reply_count, last_reply_seq/at and up to 10
--   participants. Listing a room's threads reads this table, never the replies.
-- * thread_followers: per member and thread, whether they follow it and their read
--   watermark in it (a room seq, moved forward only). Replying or being mentioned in a
--   reply follows the thread; so does following it explicitly. A user's followed threads
--   read this table by user.
-- * message_mentions: one row per mentioned member of a message (`@username`, resolved at
--   send time against the room's members; anyone else is ignored, exactly as if the text
--   named nobody) and one row with user_id NULL for a room mention (`@room`, `@here`,
--   `@all`), allowed from owners and admins only. Never one row per member per message.
--
-- All the trigger functions run BEFORE/AFTER the room row is locked by the seq trigger
-- (messages_assign_seq runs first: BEFORE triggers fire in name order, and the AFTER ones
-- run after it), so concurrent replies to one root are counted in order, exactly.
--
-- The badge read (chatkeep_badges) is SECURITY DEFINER and answers for the acting user
-- only: it reads each of the user's rooms by index, not through the per-row
-- `room_id = ANY (rooms array)` test of the row policies (a 500-element array scanned per
-- row, the cost docs/performance.md describes).

-- chatkeep:up
ALTER TABLE messages ADD COLUMN reply_to uuid;
COMMENT ON COLUMN messages.reply_to IS
    'The root message of the thread this message replies to (same room), or NULL';

-- A thread page is a range of this index, whatever the thread's depth. On a large live
-- messages table, build it first with CREATE INDEX CONCURRENTLY under this name: the
-- migration then finds it and does not lock the table (IF NOT EXISTS). On a new or small
-- table the build is a short scan of an all-NULL column.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS messages_reply_to_seq_idx ON messages (reply_to, seq)
    WHERE reply_to IS NOT NULL;

CREATE TABLE threads (
    root_id        uuid        PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    room_id        uuid        NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    root_seq       bigint      NOT NULL,
    reply_count    bigint      NOT NULL DEFAULT 0,
    last_reply_seq bigint      NOT NULL,
    last_reply_at  timestamptz NOT NULL,
    participants   uuid[]      NOT NULL DEFAULT '{}',
    CONSTRAINT threads_reply_count_check CHECK (reply_count >= 0),
    CONSTRAINT threads_participants_check CHECK (cardinality(participants) <= 10)
);
COMMENT ON TABLE threads IS 'Per thread root: reply summary, kept by triggers on messages';

-- New table, empty: nothing waits on it.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX threads_room_id_idx ON threads (room_id, last_reply_seq DESC);

CREATE TABLE thread_followers (
    root_id       uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    user_id       uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    room_id       uuid        NOT NULL,
    following     boolean     NOT NULL DEFAULT true,
    last_read_seq bigint      NOT NULL DEFAULT 0,
    last_read_at  timestamptz,
    thread_seq    bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (root_id, user_id),
    CONSTRAINT thread_followers_last_read_seq_check CHECK (last_read_seq >= 0)
);
COMMENT ON TABLE thread_followers IS
    'Per member and thread root: following or not, and the read watermark (a room seq)';
COMMENT ON COLUMN thread_followers.thread_seq IS
    'The thread''s last reply seq, copied by the triggers: badges read followers alone';

-- A user's threads, per room (the badge counts, the followed list, the cascade when a
-- user goes). thread_seq is in it so that "which followed threads have unread replies"
-- is an index-only range per room, with no probe of threads (the copy costs one small
-- update per follower of a thread on each reply; Mattermost copies thread state onto its
-- membership rows for the same reason). room_id has no foreign key of its own: the row goes with its root message,
-- which goes with its room.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX thread_followers_user_id_idx ON thread_followers (user_id, room_id)
    INCLUDE (root_id, last_read_seq, following, thread_seq);

CREATE TABLE message_mentions (
    message_id uuid   NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    user_id    uuid   REFERENCES users (id) ON DELETE CASCADE,
    room_id    uuid   NOT NULL,
    seq        bigint NOT NULL,
    root_id    uuid,
    author_id  uuid   NOT NULL,
    CONSTRAINT message_mentions_message_id_user_id_key UNIQUE (message_id, user_id)
);
COMMENT ON TABLE message_mentions IS
    'Mentions only: one row per mentioned member, or one with user_id NULL for @room';
COMMENT ON COLUMN message_mentions.user_id IS 'The mentioned member; NULL for a room mention';
-- room_id, seq, root_id and author_id are the message's, copied for the indexes; no foreign
-- keys of their own: a mention goes with its message, which goes with its room and author.

-- Mentions of a user: per room after a watermark (badges), and newest first (the inbox).
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX message_mentions_user_id_idx ON message_mentions (user_id, room_id, seq)
    WHERE user_id IS NOT NULL;
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX message_mentions_user_inbox_idx ON message_mentions (user_id, message_id)
    WHERE user_id IS NOT NULL;
-- Room mentions of a room after a watermark, and newest first.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX message_mentions_room_idx ON message_mentions (room_id, seq)
    INCLUDE (author_id, message_id) WHERE user_id IS NULL;
-- Thread mentions of a user after the thread's watermark.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX message_mentions_root_id_idx ON message_mentions (root_id, user_id, seq)
    WHERE root_id IS NOT NULL;

-- A reply's root: the replied-to message, or its root when it is itself a reply. Runs as
-- the definer (it sees every message) after messages_assign_seq checked the sender is a
-- member of NEW.room_id. A root that does not exist (never did, or was deleted), or is in
-- a room the sender is not in, is reported as missing (NotFound), so a reply_to tells an
-- outsider nothing; a root of another room the sender is in breaks the same-room rule.
CREATE FUNCTION chatkeep_thread_root() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acting uuid := nullif(current_setting('app.user_id', true), '')::uuid;
    parent_room uuid;
    parent_root uuid;
BEGIN
    SELECT m.room_id, m.reply_to INTO parent_room, parent_root
      FROM public.messages m WHERE m.id = NEW.reply_to;
    IF parent_room IS NULL
       OR (parent_room <> NEW.room_id
           AND NOT pg_has_role(session_user, 'chatapp_owner', 'MEMBER')
           AND NOT EXISTS (SELECT 1 FROM public.room_users ru
                            WHERE ru.room_id = parent_room AND ru.user_id = acting)) THEN
        RAISE EXCEPTION 'reply_to: message % does not exist', NEW.reply_to
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'messages_reply_to_fkey',
                  TABLE = 'messages';
    END IF;
    IF parent_room <> NEW.room_id THEN
        RAISE EXCEPTION 'reply_to: the message is in another room'
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'messages_reply_to_check',
                  TABLE = 'messages',
                  COLUMN = 'reply_to';
    END IF;
    NEW.reply_to := coalesce(parent_root, NEW.reply_to);
    RETURN NEW;
END
$$;

-- The members a message mentions: `@name` preceded by a start or a non-name character,
-- compared case-insensitively (usernames are unique by lower()); a trailing `.`, `-` or
-- `_` (end of a sentence) is tried off too. Only members of the room other than the
-- author; a name that is no member's (or no user's) is ignored, leaving no trace.
CREATE FUNCTION chatkeep_record_mentions(m public.messages) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    room_wide boolean;
BEGIN
    IF position('@' IN m.content) = 0 THEN
        RETURN;
    END IF;
    WITH names AS (
        SELECT DISTINCT lower(x[1]) AS name
          FROM regexp_matches(m.content, '(?:^|[^A-Za-z0-9_.@-])@([A-Za-z0-9][A-Za-z0-9_.-]{1,40})',
                              'g') AS x
    ), tried AS (
        SELECT name FROM names
        UNION
        SELECT rtrim(name, '._-') FROM names
    )
    INSERT INTO public.message_mentions (message_id, user_id, room_id, seq, root_id, author_id)
    SELECT m.id, u.id, m.room_id, m.seq, m.reply_to, m.user_id
      FROM tried
      JOIN public.users u ON lower(u.username) = tried.name
      JOIN public.room_users ru ON ru.room_id = m.room_id AND ru.user_id = u.id
     WHERE u.id <> m.user_id AND tried.name NOT IN ('room', 'here', 'all')
    ON CONFLICT DO NOTHING;

    room_wide := m.content ~* '(^|[^A-Za-z0-9_.@-])@(room|here|all)([^A-Za-z0-9_]|$)'
        AND EXISTS (SELECT 1 FROM public.room_users ru
                     WHERE ru.room_id = m.room_id AND ru.user_id = m.user_id
                       AND ru.role IN ('owner', 'admin'));
    IF room_wide THEN
        INSERT INTO public.message_mentions (message_id, user_id, room_id, seq, root_id,
                                             author_id)
        VALUES (m.id, NULL, m.room_id, m.seq, m.reply_to, m.user_id);
    END IF;

    -- Mentioned in a reply: the member follows the thread.
    IF m.reply_to IS NOT NULL THEN
        INSERT INTO public.thread_followers (root_id, user_id, room_id)
        SELECT m.reply_to, mm.user_id, m.room_id
          FROM public.message_mentions mm
         WHERE mm.message_id = m.id AND mm.user_id IS NOT NULL
        ON CONFLICT (root_id, user_id) DO UPDATE SET following = true;
    END IF;
END
$$;

-- After a message is stored: its thread's summary, the followers, its mentions. The room
-- row is locked by then (messages_assign_seq), so replies to one root count in order.
CREATE FUNCTION chatkeep_message_stored() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    root_author uuid;
    root_seq bigint;
BEGIN
    IF NEW.reply_to IS NOT NULL THEN
        SELECT m.user_id, m.seq INTO root_author, root_seq
          FROM public.messages m WHERE m.id = NEW.reply_to;
        INSERT INTO public.threads AS t
               (root_id, room_id, root_seq, reply_count, last_reply_seq, last_reply_at,
                participants)
        VALUES (NEW.reply_to, NEW.room_id, root_seq, 1, NEW.seq, NEW.created_at,
                ARRAY[NEW.user_id])
        ON CONFLICT (root_id) DO UPDATE
           SET reply_count = t.reply_count + 1,
               last_reply_seq = GREATEST(t.last_reply_seq, EXCLUDED.last_reply_seq),
               last_reply_at = GREATEST(t.last_reply_at, EXCLUDED.last_reply_at),
               participants = CASE
                   WHEN NEW.user_id = ANY (t.participants) OR cardinality(t.participants) >= 10
                   THEN t.participants
                   ELSE t.participants || NEW.user_id END;
        UPDATE public.thread_followers SET thread_seq = NEW.seq
         WHERE root_id = NEW.reply_to AND thread_seq < NEW.seq;
        -- The root's author follows the thread (unless they unfollowed it); the replier
        -- follows it and has read up to their own reply.
        INSERT INTO public.thread_followers (root_id, user_id, room_id)
        VALUES (NEW.reply_to, root_author, NEW.room_id)
        ON CONFLICT (root_id, user_id) DO NOTHING;
        INSERT INTO public.thread_followers AS f
               (root_id, user_id, room_id, last_read_seq, last_read_at)
        VALUES (NEW.reply_to, NEW.user_id, NEW.room_id, NEW.seq, NEW.created_at)
        ON CONFLICT (root_id, user_id) DO UPDATE
           SET following = true,
               last_read_seq = GREATEST(f.last_read_seq, EXCLUDED.last_read_seq),
               last_read_at = CASE WHEN EXCLUDED.last_read_seq > f.last_read_seq
                                   THEN EXCLUDED.last_read_at ELSE f.last_read_at END;
    END IF;
    PERFORM public.chatkeep_record_mentions(NEW);
    RETURN NULL;
END
$$;

-- An edit re-resolves the mentions (new names count, removed ones no longer do).
CREATE FUNCTION chatkeep_message_edited() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM public.message_mentions WHERE message_id = NEW.id;
    PERFORM public.chatkeep_record_mentions(NEW);
    RETURN NULL;
END
$$;

-- A deleted reply leaves its thread: one fewer reply, the last reply read back from the
-- (reply_to, seq) index. Its mentions go by cascade. The room row is locked first (as
-- every change of the room does), so this is ordered with concurrent replies.
CREATE FUNCTION chatkeep_message_removed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM 1 FROM public.rooms WHERE id = OLD.room_id FOR NO KEY UPDATE;
    UPDATE public.threads t
       SET reply_count = GREATEST(t.reply_count - 1, 0),
           last_reply_seq = coalesce(
               (SELECT max(m.seq) FROM public.messages m WHERE m.reply_to = OLD.reply_to),
               t.root_seq)
     WHERE t.root_id = OLD.reply_to;
    UPDATE public.thread_followers f SET thread_seq = t.last_reply_seq
      FROM public.threads t
     WHERE t.root_id = OLD.reply_to AND f.root_id = OLD.reply_to
       AND f.thread_seq <> t.last_reply_seq;
    RETURN NULL;
END
$$;

-- A follower row takes its room from its root message (the insert policy then checks the
-- acting user is a member of that room), as message_reactions does, and the thread's last
-- reply seq from threads (0 while it has none).
CREATE FUNCTION chatkeep_thread_follower_room() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT m.room_id INTO NEW.room_id FROM public.messages m WHERE m.id = NEW.root_id;
    IF NEW.room_id IS NULL THEN
        RAISE EXCEPTION 'message % does not exist', NEW.root_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'thread_followers_root_id_fkey',
                  TABLE = 'thread_followers';
    END IF;
    NEW.thread_seq := coalesce(
        (SELECT t.last_reply_seq FROM public.threads t WHERE t.root_id = NEW.root_id), 0);
    RETURN NEW;
END
$$;

REVOKE EXECUTE ON FUNCTION chatkeep_thread_root() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_record_mentions(messages) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_message_stored() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_message_edited() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_message_removed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_thread_follower_room() FROM PUBLIC;

CREATE TRIGGER messages_thread_root BEFORE INSERT ON messages
    FOR EACH ROW WHEN (NEW.reply_to IS NOT NULL)
    EXECUTE FUNCTION chatkeep_thread_root();
CREATE TRIGGER messages_thread_stored AFTER INSERT ON messages
    FOR EACH ROW WHEN (NEW.reply_to IS NOT NULL OR strpos(NEW.content, '@') > 0)
    EXECUTE FUNCTION chatkeep_message_stored();
CREATE TRIGGER messages_thread_edited AFTER UPDATE ON messages
    FOR EACH ROW WHEN (OLD.content IS DISTINCT FROM NEW.content)
    EXECUTE FUNCTION chatkeep_message_edited();
CREATE TRIGGER messages_thread_removed AFTER DELETE ON messages
    FOR EACH ROW WHEN (OLD.reply_to IS NOT NULL)
    EXECUTE FUNCTION chatkeep_message_removed();
CREATE TRIGGER thread_followers_room BEFORE INSERT ON thread_followers
    FOR EACH ROW EXECUTE FUNCTION chatkeep_thread_follower_room();

-- Badges: for every room of the acting user, in one statement: unread messages, unread
-- mentions (of them, or of the room by someone else), followed threads with unread
-- replies, and unread mentions in followed threads. Each count is an index range after a
-- watermark over the sparse tables; nothing counts messages. For the acting user only:
-- it reads no one else's rows, so it needs no row policy, and skips their per-row cost.
CREATE FUNCTION chatkeep_badges(for_user uuid)
RETURNS TABLE (room_id uuid, unread bigint, mentions bigint, unread_threads bigint,
               thread_mentions bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    acting uuid := nullif(current_setting('app.user_id', true), '')::uuid;
BEGIN
    IF acting IS DISTINCT FROM for_user THEN
        RAISE EXCEPTION 'chatkeep_badges() answers for the acting user only'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY
    SELECT ru.room_id,
           GREATEST(r.last_seq - ru.last_read_seq, 0),
           -- A room read to the end has no unread mention: no probe at all.
           CASE WHEN r.last_seq > ru.last_read_seq THEN
               (SELECT count(*) FROM public.message_mentions mm
                 WHERE mm.user_id = acting AND mm.room_id = ru.room_id
                   AND mm.seq > ru.last_read_seq)
               + (SELECT count(*) FROM public.message_mentions mm
                   WHERE mm.user_id IS NULL AND mm.room_id = ru.room_id
                     AND mm.seq > ru.last_read_seq AND mm.author_id <> acting)
           ELSE 0 END,
           th.unread_threads,
           th.thread_mentions
      FROM public.room_users ru
      JOIN public.rooms r ON r.id = ru.room_id
      CROSS JOIN LATERAL (
            -- One index-only range of the user's followed threads in the room, and a
            -- mention probe for each thread with unread replies only.
            SELECT count(*) AS unread_threads,
                   coalesce(sum((SELECT count(*) FROM public.message_mentions mm
                                  WHERE mm.root_id = f.root_id AND mm.user_id = acting
                                    AND mm.seq > f.last_read_seq)), 0)::bigint
                       AS thread_mentions
              FROM public.thread_followers f
             WHERE f.user_id = acting AND f.room_id = ru.room_id AND f.following
               AND f.thread_seq > f.last_read_seq
           ) AS th
     WHERE ru.user_id = acting;
END
$$;
REVOKE EXECUTE ON FUNCTION chatkeep_badges(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_badges(uuid) TO chatapp_app, chatapp_owner;

-- Row security: members of a thread's room see its summary and its mentions; a member
-- sees and writes only their own follower rows, in rooms they are in. Nobody but the
-- triggers writes threads and mentions.
ALTER TABLE threads ENABLE ROW LEVEL SECURITY;
ALTER TABLE threads FORCE ROW LEVEL SECURITY;
CREATE POLICY threads_select ON threads FOR SELECT TO chatapp_app
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));
CREATE POLICY threads_readonly ON threads FOR SELECT TO chatapp_readonly USING (true);
CREATE POLICY threads_system ON threads TO chatapp_owner USING (true) WITH CHECK (true);

ALTER TABLE thread_followers ENABLE ROW LEVEL SECURITY;
ALTER TABLE thread_followers FORCE ROW LEVEL SECURITY;
CREATE POLICY thread_followers_select ON thread_followers FOR SELECT TO chatapp_app
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
CREATE POLICY thread_followers_insert ON thread_followers FOR INSERT TO chatapp_app
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    );
CREATE POLICY thread_followers_update ON thread_followers FOR UPDATE TO chatapp_app
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[])
    )
    WITH CHECK (user_id = (SELECT chatkeep_acting_user_id()));
CREATE POLICY thread_followers_readonly ON thread_followers FOR SELECT
    TO chatapp_readonly USING (true);
CREATE POLICY thread_followers_system ON thread_followers TO chatapp_owner
    USING (true) WITH CHECK (true);

ALTER TABLE message_mentions ENABLE ROW LEVEL SECURITY;
ALTER TABLE message_mentions FORCE ROW LEVEL SECURITY;
CREATE POLICY message_mentions_select ON message_mentions FOR SELECT TO chatapp_app
    USING (room_id = ANY ((SELECT chatkeep_acting_rooms('member'))::uuid[]));
CREATE POLICY message_mentions_readonly ON message_mentions FOR SELECT
    TO chatapp_readonly USING (true);
CREATE POLICY message_mentions_system ON message_mentions TO chatapp_owner
    USING (true) WITH CHECK (true);

-- Least privilege (011): the app writes reply_to on a send, reads the thread state and
-- mentions, and writes only its own follow flag and thread watermark.
GRANT INSERT (reply_to) ON messages TO chatapp_app;
GRANT SELECT ON threads, message_mentions TO chatapp_app;
GRANT SELECT ON thread_followers TO chatapp_app;
GRANT INSERT (root_id, user_id, following, last_read_seq, last_read_at)
    ON thread_followers TO chatapp_app;
GRANT UPDATE (following, last_read_seq, last_read_at) ON thread_followers TO chatapp_app;
GRANT SELECT ON threads, thread_followers, message_mentions TO chatapp_readonly;

-- The one-round-trip flow functions of 013 return reply_to too (their result types
-- change, so they are dropped and created again; the bodies are 013's plus the column).
-- (Only chatkeep calls them.)
-- squawk-ignore ban-drop-function
DROP FUNCTION chatkeep_history(uuid, uuid, bigint, integer, integer);
-- squawk-ignore ban-drop-function
DROP FUNCTION chatkeep_rooms_of(uuid, boolean);
-- squawk-ignore ban-drop-function
DROP FUNCTION chatkeep_changes(uuid, uuid, bigint, integer);

CREATE FUNCTION chatkeep_history(
    acting uuid, room uuid, pivot bigint, older integer, newer integer
) RETURNS TABLE (
    id uuid, room_id uuid, user_id uuid, seq bigint, client_msg_id text, content text,
    type message_type, is_edited boolean, edited_at timestamptz, created_at timestamptz,
    reply_to uuid, username text, avatar_url text, emoji text[], n bigint[], me boolean[]
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    RETURN QUERY
    SELECT m.id, m.room_id, m.user_id, m.seq, m.client_msg_id, m.content, m.type,
           m.is_edited, m.edited_at, m.created_at, m.reply_to, u.username, u.avatar_url,
           rx.emoji, rx.n, rx.me
      FROM ((SELECT x.id, x.room_id, x.user_id, x.seq, x.client_msg_id, x.content, x.type,
                    x.is_edited, x.edited_at, x.created_at, x.reply_to
               FROM messages x
              WHERE x.room_id = chatkeep_history.room AND x.seq < chatkeep_history.pivot
              ORDER BY x.seq DESC LIMIT chatkeep_history.older)
            UNION ALL
            (SELECT x.id, x.room_id, x.user_id, x.seq, x.client_msg_id, x.content, x.type,
                    x.is_edited, x.edited_at, x.created_at, x.reply_to
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

CREATE FUNCTION chatkeep_rooms_of(acting uuid, include_inactive boolean)
RETURNS TABLE (
    id uuid, name text, description text, type room_type, created_by uuid,
    is_active boolean, last_seq bigint, created_at timestamptz, updated_at timestamptz,
    role room_role, last_read_seq bigint, unread_count bigint,
    m_id uuid, m_user_id uuid, m_seq bigint, m_client_msg_id text, m_content text,
    m_type message_type, m_is_edited boolean, m_edited_at timestamptz,
    m_created_at timestamptz, m_reply_to uuid, m_username text, m_avatar_url text
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
           m.edited_at, m.created_at, m.reply_to, u.username, u.avatar_url
      FROM room_users ru
      JOIN rooms r ON r.id = ru.room_id
      LEFT JOIN LATERAL (
            SELECT mm.id, mm.user_id, mm.seq, mm.client_msg_id, mm.content, mm.type,
                   mm.is_edited, mm.edited_at, mm.created_at, mm.reply_to
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

CREATE FUNCTION chatkeep_changes(acting uuid, room uuid, after_position bigint, max_rows integer)
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

REVOKE EXECUTE ON FUNCTION chatkeep_history(uuid, uuid, bigint, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_history(uuid, uuid, bigint, integer, integer) TO chatapp_app, chatapp_owner;
REVOKE EXECUTE ON FUNCTION chatkeep_rooms_of(uuid, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_rooms_of(uuid, boolean) TO chatapp_app, chatapp_owner;
REVOKE EXECUTE ON FUNCTION chatkeep_changes(uuid, uuid, bigint, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_changes(uuid, uuid, bigint, integer) TO chatapp_app, chatapp_owner;

-- 014's batch send takes each message's reply_to too (a new argument and result
-- column: dropped and created again; the body is 014's plus the column).
-- squawk-ignore ban-drop-function
DROP FUNCTION chatkeep_send_messages(uuid[], uuid[], uuid[], text[], text[], message_type[]);

CREATE FUNCTION chatkeep_send_messages(
    ids uuid[],
    room_ids uuid[],
    user_ids uuid[],
    client_msg_ids text[],
    contents text[],
    types message_type[],
    reply_tos uuid[]
) RETURNS TABLE (
    idx integer,
    outcome text,
    id uuid,
    room_id uuid,
    user_id uuid,
    seq bigint,
    client_msg_id text,
    content text,
    type message_type,
    is_edited boolean,
    edited_at timestamptz,
    created_at timestamptz,
    reply_to uuid,
    "position" bigint
)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = public, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    caller text := coalesce(current_setting('app.user_id', true), '');
    n integer := coalesce(cardinality(ids), 0);
    i integer;
    active boolean;
    member boolean;
BEGIN
    IF coalesce(cardinality(room_ids), 0) <> n OR coalesce(cardinality(user_ids), 0) <> n
       OR coalesce(cardinality(client_msg_ids), 0) <> n
       OR coalesce(cardinality(contents), 0) <> n OR coalesce(cardinality(types), 0) <> n
       OR coalesce(cardinality(reply_tos), 0) <> n THEN
        RAISE EXCEPTION 'chatkeep_send_messages: the arrays differ in length'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN SELECT g FROM generate_subscripts(ids, 1) AS g ORDER BY room_ids[g], g LOOP
        IF caller <> '' AND caller <> user_ids[i]::text THEN
            RAISE EXCEPTION 'new row violates row-level security policy for table "messages"'
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'the transaction acts as another user';
        END IF;
        PERFORM set_config('app.user_id', user_ids[i]::text, true);
        idx := i;
        WITH existing AS (
            SELECT m.id, m.room_id, m.user_id, m.seq, m.client_msg_id, m.content, m.type,
                   m.is_edited, m.edited_at, m.created_at, m.reply_to
              FROM messages m
             WHERE m.room_id = room_ids[i] AND m.user_id = user_ids[i]
               AND m.client_msg_id = client_msg_ids[i]
        ), inserted AS (
            INSERT INTO messages (id, room_id, user_id, client_msg_id, content, type, reply_to)
            SELECT ids[i], room_ids[i], user_ids[i], client_msg_ids[i], contents[i], types[i],
                   reply_tos[i]
             WHERE NOT EXISTS (SELECT 1 FROM existing)
               AND EXISTS (SELECT 1 FROM rooms r WHERE r.id = room_ids[i] AND r.is_active)
               AND EXISTS (SELECT 1 FROM room_users ru
                            WHERE ru.room_id = room_ids[i] AND ru.user_id = user_ids[i])
            RETURNING messages.id, messages.room_id, messages.user_id, messages.seq,
                      messages.client_msg_id, messages.content, messages.type,
                      messages.is_edited, messages.edited_at, messages.created_at,
                      messages.reply_to,
                      nullif(current_setting('chatkeep.position', true), '')::bigint AS pos
        ), seen AS (
            UPDATE room_users SET last_read_seq = inserted.seq,
                                  last_read_at = inserted.created_at
              FROM inserted
             WHERE room_users.room_id = room_ids[i] AND room_users.user_id = user_ids[i]
               AND room_users.last_read_seq < inserted.seq
        )
        SELECT x.outcome, x.id, x.room_id, x.user_id, x.seq, x.client_msg_id, x.content,
               x.type, x.is_edited, x.edited_at, x.created_at, x.reply_to, x.pos
          INTO outcome, id, room_id, user_id, seq, client_msg_id, content, type, is_edited,
               edited_at, created_at, reply_to, "position"
          FROM (SELECT 'sent' AS outcome, inserted.* FROM inserted
                UNION ALL
                SELECT 'existing', existing.*, NULL::bigint FROM existing) AS x;
        IF NOT FOUND THEN
            -- Why not, as the sender sees it: a room they cannot see is no room at all.
            SELECT r.is_active,
                   EXISTS (SELECT 1 FROM room_users ru
                            WHERE ru.room_id = r.id AND ru.user_id = user_ids[i])
              INTO active, member
              FROM rooms r WHERE r.id = room_ids[i];
            outcome := CASE WHEN active IS NULL THEN 'no_room'
                            WHEN NOT member THEN 'not_member'
                            ELSE 'archived' END;
            id := NULL; room_id := room_ids[i]; user_id := user_ids[i]; seq := NULL;
            client_msg_id := client_msg_ids[i]; content := NULL; type := NULL;
            is_edited := NULL; edited_at := NULL; created_at := NULL; reply_to := NULL;
            "position" := NULL;
        END IF;
        RETURN NEXT;
    END LOOP;
    PERFORM set_config('app.user_id', caller, true);
END
$$;

COMMENT ON FUNCTION chatkeep_send_messages(uuid[], uuid[], uuid[], text[], text[], message_type[], uuid[])
    IS 'Store a batch of messages (replies too), each as its own sender under row security, in one statement';

REVOKE EXECUTE ON FUNCTION
    chatkeep_send_messages(uuid[], uuid[], uuid[], text[], text[], message_type[], uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    chatkeep_send_messages(uuid[], uuid[], uuid[], text[], text[], message_type[], uuid[])
    TO chatapp_app, chatapp_owner;

-- chatkeep:down

-- 014's batch send, without reply_to.
DROP FUNCTION chatkeep_send_messages(uuid[], uuid[], uuid[], text[], text[], message_type[], uuid[]);

CREATE FUNCTION chatkeep_send_messages(
    ids uuid[],
    room_ids uuid[],
    user_ids uuid[],
    client_msg_ids text[],
    contents text[],
    types message_type[]
) RETURNS TABLE (
    idx integer,
    outcome text,
    id uuid,
    room_id uuid,
    user_id uuid,
    seq bigint,
    client_msg_id text,
    content text,
    type message_type,
    is_edited boolean,
    edited_at timestamptz,
    created_at timestamptz,
    "position" bigint
)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = public, pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    caller text := coalesce(current_setting('app.user_id', true), '');
    n integer := coalesce(cardinality(ids), 0);
    i integer;
    active boolean;
    member boolean;
BEGIN
    IF coalesce(cardinality(room_ids), 0) <> n OR coalesce(cardinality(user_ids), 0) <> n
       OR coalesce(cardinality(client_msg_ids), 0) <> n
       OR coalesce(cardinality(contents), 0) <> n OR coalesce(cardinality(types), 0) <> n THEN
        RAISE EXCEPTION 'chatkeep_send_messages: the arrays differ in length'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN SELECT g FROM generate_subscripts(ids, 1) AS g ORDER BY room_ids[g], g LOOP
        IF caller <> '' AND caller <> user_ids[i]::text THEN
            RAISE EXCEPTION 'new row violates row-level security policy for table "messages"'
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'the transaction acts as another user';
        END IF;
        PERFORM set_config('app.user_id', user_ids[i]::text, true);
        idx := i;
        WITH existing AS (
            SELECT m.id, m.room_id, m.user_id, m.seq, m.client_msg_id, m.content, m.type,
                   m.is_edited, m.edited_at, m.created_at
              FROM messages m
             WHERE m.room_id = room_ids[i] AND m.user_id = user_ids[i]
               AND m.client_msg_id = client_msg_ids[i]
        ), inserted AS (
            INSERT INTO messages (id, room_id, user_id, client_msg_id, content, type)
            SELECT ids[i], room_ids[i], user_ids[i], client_msg_ids[i], contents[i], types[i]
             WHERE NOT EXISTS (SELECT 1 FROM existing)
               AND EXISTS (SELECT 1 FROM rooms r WHERE r.id = room_ids[i] AND r.is_active)
               AND EXISTS (SELECT 1 FROM room_users ru
                            WHERE ru.room_id = room_ids[i] AND ru.user_id = user_ids[i])
            RETURNING messages.id, messages.room_id, messages.user_id, messages.seq,
                      messages.client_msg_id, messages.content, messages.type,
                      messages.is_edited, messages.edited_at, messages.created_at,
                      nullif(current_setting('chatkeep.position', true), '')::bigint AS pos
        ), seen AS (
            UPDATE room_users SET last_read_seq = inserted.seq,
                                  last_read_at = inserted.created_at
              FROM inserted
             WHERE room_users.room_id = room_ids[i] AND room_users.user_id = user_ids[i]
               AND room_users.last_read_seq < inserted.seq
        )
        SELECT x.outcome, x.id, x.room_id, x.user_id, x.seq, x.client_msg_id, x.content,
               x.type, x.is_edited, x.edited_at, x.created_at, x.pos
          INTO outcome, id, room_id, user_id, seq, client_msg_id, content, type, is_edited,
               edited_at, created_at, "position"
          FROM (SELECT 'sent' AS outcome, inserted.* FROM inserted
                UNION ALL
                SELECT 'existing', existing.*, NULL::bigint FROM existing) AS x;
        IF NOT FOUND THEN
            -- Why not, as the sender sees it: a room they cannot see is no room at all.
            SELECT r.is_active,
                   EXISTS (SELECT 1 FROM room_users ru
                            WHERE ru.room_id = r.id AND ru.user_id = user_ids[i])
              INTO active, member
              FROM rooms r WHERE r.id = room_ids[i];
            outcome := CASE WHEN active IS NULL THEN 'no_room'
                            WHEN NOT member THEN 'not_member'
                            ELSE 'archived' END;
            id := NULL; room_id := room_ids[i]; user_id := user_ids[i]; seq := NULL;
            client_msg_id := client_msg_ids[i]; content := NULL; type := NULL;
            is_edited := NULL; edited_at := NULL; created_at := NULL; "position" := NULL;
        END IF;
        RETURN NEXT;
    END LOOP;
    PERFORM set_config('app.user_id', caller, true);
END
$$;

COMMENT ON FUNCTION chatkeep_send_messages(uuid[], uuid[], uuid[], text[], text[], message_type[])
    IS 'Store a batch of messages, each as its own sender under row security, in one statement';

REVOKE EXECUTE ON FUNCTION
    chatkeep_send_messages(uuid[], uuid[], uuid[], text[], text[], message_type[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    chatkeep_send_messages(uuid[], uuid[], uuid[], text[], text[], message_type[])
    TO chatapp_app, chatapp_owner;

-- 013's flow functions, without reply_to.
DROP FUNCTION chatkeep_history(uuid, uuid, bigint, integer, integer);
DROP FUNCTION chatkeep_rooms_of(uuid, boolean);
DROP FUNCTION chatkeep_changes(uuid, uuid, bigint, integer);

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

REVOKE EXECUTE ON FUNCTION chatkeep_history(uuid, uuid, bigint, integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_history(uuid, uuid, bigint, integer, integer) TO chatapp_app, chatapp_owner;
REVOKE EXECUTE ON FUNCTION chatkeep_rooms_of(uuid, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_rooms_of(uuid, boolean) TO chatapp_app, chatapp_owner;
REVOKE EXECUTE ON FUNCTION chatkeep_changes(uuid, uuid, bigint, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_changes(uuid, uuid, bigint, integer) TO chatapp_app, chatapp_owner;

REVOKE ALL ON threads, thread_followers, message_mentions FROM chatapp_app, chatapp_readonly;
REVOKE INSERT (reply_to) ON messages FROM chatapp_app;
DROP FUNCTION chatkeep_badges(uuid);
DROP TRIGGER thread_followers_room ON thread_followers;
DROP TRIGGER messages_thread_removed ON messages;
DROP TRIGGER messages_thread_edited ON messages;
DROP TRIGGER messages_thread_stored ON messages;
DROP TRIGGER messages_thread_root ON messages;
DROP FUNCTION chatkeep_thread_follower_room();
DROP FUNCTION chatkeep_message_removed();
DROP FUNCTION chatkeep_message_edited();
DROP FUNCTION chatkeep_message_stored();
DROP FUNCTION chatkeep_record_mentions(messages);
DROP FUNCTION chatkeep_thread_root();
DROP TABLE message_mentions;
DROP TABLE thread_followers;
DROP TABLE threads;
DROP INDEX messages_reply_to_seq_idx;
ALTER TABLE messages DROP COLUMN reply_to;
