-- Threads, mentions and badges on Citus (issue 17; docs/design.md, "Citus mode").
--
-- 015 built threads, thread_followers and message_mentions for PostgreSQL: keyed by
-- message id alone, kept by triggers that look a message up by its id, guarded by policies
-- with subqueries. Citus can take none of that, so on Citus 015 ran only its reply_to
-- column and a CHECK refusing replies. This migration's Citus part builds the same
-- feature in the shape Citus needs; plain PostgreSQL keeps 015's shape unchanged (its
-- up part here only restates a comment):
--
-- * The three tables are distributed by room_id, colocated with rooms and messages: every
--   key includes the room (threads (room_id, root_id), thread_followers (room_id, root_id,
--   user_id), message_mentions (room_id, message_id, user_id)) and they reference
--   messages through (room_id, id), so a room's thread state lives in its shard group.
-- * The trigger functions take every row by its room: a reply's root is looked up as
--   (NEW.room_id, NEW.reply_to), so each query a trigger makes runs on the colocated
--   shard of the same worker, in the same transaction (docs/design.md says why that is
--   safe). A reply_to naming a message of another room therefore reads as missing
--   (NotFound), where PostgreSQL says "in another room" (InvalidInput): telling them apart
--   would read every shard.
-- * Mentions are resolved by a loop of single-shard inserts, not INSERT ... SELECT with a
--   CTE (Citus would plan that in several steps from inside a shard's trigger).
-- * Policies call chatkeep_room_role_at_least(room_id, 'member') (012's Citus part), no
--   subqueries; the application writes a follower row's room_id (a trigger on a shard
--   cannot move a row to another shard) and the trigger checks the root is in that room.
-- * chatkeep_badges keeps 015's statement, every correlation on the room, so Citus pushes
--   the whole of it down to each worker's shards (a user's rooms are on every shard).

-- chatkeep:up
COMMENT ON COLUMN messages.reply_to IS
    'The root message of the thread this message replies to (same room), or NULL';

-- chatkeep:citus
-- 015's Citus part refused replies until threads were distributed: they are now.
ALTER TABLE messages DROP CONSTRAINT messages_no_replies_on_citus;

-- A thread is named by any of its messages' ids alone (the facade takes a message id), so
-- its room is looked up first by id on every shard: an index on id makes that one probe
-- per shard rather than a scan of the (room_id, id) key. On a large live table, build it
-- first with CREATE INDEX CONCURRENTLY under this name.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS messages_id_idx ON messages (id);

CREATE TABLE threads (
    room_id        uuid        NOT NULL,
    root_id        uuid        NOT NULL,
    root_seq       bigint      NOT NULL,
    reply_count    bigint      NOT NULL DEFAULT 0,
    last_reply_seq bigint      NOT NULL,
    last_reply_at  timestamptz NOT NULL,
    participants   uuid[]      NOT NULL DEFAULT '{}',
    PRIMARY KEY (room_id, root_id),
    CONSTRAINT threads_reply_count_check CHECK (reply_count >= 0),
    CONSTRAINT threads_participants_check CHECK (cardinality(participants) <= 10)
);
COMMENT ON TABLE threads IS 'Per thread root: reply summary, kept by triggers on messages';
-- New table, empty: nothing waits on it.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX threads_room_id_idx ON threads (room_id, last_reply_seq DESC);

CREATE TABLE thread_followers (
    room_id       uuid        NOT NULL,
    root_id       uuid        NOT NULL,
    user_id       uuid        NOT NULL,
    following     boolean     NOT NULL DEFAULT true,
    last_read_seq bigint      NOT NULL DEFAULT 0,
    last_read_at  timestamptz,
    thread_seq    bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, root_id, user_id),
    CONSTRAINT thread_followers_last_read_seq_check CHECK (last_read_seq >= 0)
);
COMMENT ON TABLE thread_followers IS
    'Per member and thread root: following or not, and the read watermark (a room seq)';
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX thread_followers_user_id_idx ON thread_followers (user_id, room_id)
    INCLUDE (root_id, last_read_seq, following, thread_seq);

CREATE TABLE message_mentions (
    room_id    uuid   NOT NULL,
    message_id uuid   NOT NULL,
    user_id    uuid,
    seq        bigint NOT NULL,
    root_id    uuid,
    author_id  uuid   NOT NULL,
    CONSTRAINT message_mentions_message_id_user_id_key UNIQUE (room_id, message_id, user_id)
);
COMMENT ON TABLE message_mentions IS
    'Mentions only: one row per mentioned member, or one with user_id NULL for @room';
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX message_mentions_user_id_idx ON message_mentions (user_id, room_id, seq)
    WHERE user_id IS NOT NULL;
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX message_mentions_user_inbox_idx ON message_mentions (user_id, message_id)
    WHERE user_id IS NOT NULL;
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX message_mentions_room_idx ON message_mentions (room_id, seq)
    INCLUDE (author_id, message_id) WHERE user_id IS NULL;
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX message_mentions_root_id_idx ON message_mentions (room_id, root_id, user_id, seq)
    WHERE root_id IS NOT NULL;

-- A reply's root, looked up in the reply's own room: the replied-to message, or its root
-- when it is itself a reply. The sender's membership of NEW.room_id was checked by
-- messages_assign_seq (it fires first, by name). A root that is not in this room (none,
-- a deleted one, or one of another room) is reported as missing.
CREATE FUNCTION chatkeep_thread_root() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parent_root uuid;
BEGIN
    SELECT m.reply_to INTO parent_root
      FROM public.messages m WHERE m.room_id = NEW.room_id AND m.id = NEW.reply_to;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'reply_to: message % does not exist', NEW.reply_to
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'messages_reply_to_fkey',
                  TABLE = 'messages';
    END IF;
    NEW.reply_to := coalesce(parent_root, NEW.reply_to);
    RETURN NEW;
END
$$;

-- The members a message mentions, as 015 resolves them (the same patterns), each stored
-- by a single-shard insert in the message's room. It takes the message's fields, not the
-- row: on a worker the trigger's row is of the shard's type (messages_102008), not
-- messages.
CREATE FUNCTION chatkeep_record_mentions(
    room uuid, message uuid, author uuid, message_seq bigint, root uuid, content text
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted text[];
    who uuid;
    mentioned uuid[] := '{}';
BEGIN
    IF position('@' IN content) = 0 THEN
        RETURN;
    END IF;
    SELECT coalesce(array_agg(DISTINCT t.name), '{}') INTO wanted
      FROM (SELECT lower(x[1]) AS name
              FROM regexp_matches(content,
                                  '(?:^|[^A-Za-z0-9_.@-])@([A-Za-z0-9][A-Za-z0-9_.-]{1,40})',
                                  'g') AS x) AS n
      CROSS JOIN LATERAL (VALUES (n.name), (rtrim(n.name, '._-'))) AS t (name)
     WHERE t.name NOT IN ('room', 'here', 'all');
    IF cardinality(wanted) > 0 THEN
        FOR who IN
            SELECT ru.user_id FROM public.room_users ru
              JOIN public.users u ON u.id = ru.user_id
             WHERE ru.room_id = room AND lower(u.username) = ANY (wanted)
               AND ru.user_id <> author
        LOOP
            INSERT INTO public.message_mentions
                   (room_id, message_id, user_id, seq, root_id, author_id)
            VALUES (room, message, who, message_seq, root, author)
            ON CONFLICT DO NOTHING;
            mentioned := mentioned || who;
        END LOOP;
    END IF;

    IF content ~* '(^|[^A-Za-z0-9_.@-])@(room|here|all)([^A-Za-z0-9_]|$)'
       AND EXISTS (SELECT 1 FROM public.room_users ru
                    WHERE ru.room_id = room AND ru.user_id = author
                      AND ru.role IN ('owner', 'admin')) THEN
        INSERT INTO public.message_mentions (room_id, message_id, user_id, seq, root_id,
                                             author_id)
        VALUES (room, message, NULL, message_seq, root, author);
    END IF;

    -- Mentioned in a reply: the member follows the thread.
    IF root IS NOT NULL THEN
        FOREACH who IN ARRAY mentioned LOOP
            INSERT INTO public.thread_followers (room_id, root_id, user_id)
            VALUES (room, root, who)
            ON CONFLICT (room_id, root_id, user_id) DO UPDATE SET following = true;
        END LOOP;
    END IF;
END
$$;

-- After a message is stored: its thread's summary, the followers, its mentions (015's
-- rules; every statement names the room).
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
          FROM public.messages m WHERE m.room_id = NEW.room_id AND m.id = NEW.reply_to;
        INSERT INTO public.threads AS t
               (room_id, root_id, root_seq, reply_count, last_reply_seq, last_reply_at,
                participants)
        VALUES (NEW.room_id, NEW.reply_to, root_seq, 1, NEW.seq, NEW.created_at,
                ARRAY[NEW.user_id])
        ON CONFLICT (room_id, root_id) DO UPDATE
           SET reply_count = t.reply_count + 1,
               last_reply_seq = GREATEST(t.last_reply_seq, EXCLUDED.last_reply_seq),
               last_reply_at = GREATEST(t.last_reply_at, EXCLUDED.last_reply_at),
               participants = CASE
                   WHEN EXCLUDED.participants[1] = ANY (t.participants)
                        OR cardinality(t.participants) >= 10
                   THEN t.participants
                   ELSE t.participants || EXCLUDED.participants[1] END;
        UPDATE public.thread_followers SET thread_seq = NEW.seq
         WHERE room_id = NEW.room_id AND root_id = NEW.reply_to AND thread_seq < NEW.seq;
        INSERT INTO public.thread_followers (room_id, root_id, user_id)
        VALUES (NEW.room_id, NEW.reply_to, root_author)
        ON CONFLICT (room_id, root_id, user_id) DO NOTHING;
        INSERT INTO public.thread_followers AS f
               (room_id, root_id, user_id, last_read_seq, last_read_at)
        VALUES (NEW.room_id, NEW.reply_to, NEW.user_id, NEW.seq, NEW.created_at)
        ON CONFLICT (room_id, root_id, user_id) DO UPDATE
           SET following = true,
               last_read_seq = GREATEST(f.last_read_seq, EXCLUDED.last_read_seq),
               last_read_at = CASE WHEN EXCLUDED.last_read_seq > f.last_read_seq
                                   THEN EXCLUDED.last_read_at ELSE f.last_read_at END;
    END IF;
    PERFORM public.chatkeep_record_mentions(
        NEW.room_id, NEW.id, NEW.user_id, NEW.seq, NEW.reply_to, NEW.content);
    RETURN NULL;
END
$$;

CREATE FUNCTION chatkeep_message_edited() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM public.message_mentions WHERE room_id = NEW.room_id AND message_id = NEW.id;
    PERFORM public.chatkeep_record_mentions(
        NEW.room_id, NEW.id, NEW.user_id, NEW.seq, NEW.reply_to, NEW.content);
    RETURN NULL;
END
$$;

-- A deleted reply leaves its thread; the last reply is read back first (a variable, not a
-- subquery of the UPDATE), under the room row's lock as in 015.
CREATE FUNCTION chatkeep_message_removed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    newest bigint;
    last_seq bigint;
BEGIN
    PERFORM 1 FROM public.rooms WHERE id = OLD.room_id FOR NO KEY UPDATE;
    SELECT max(m.seq) INTO newest FROM public.messages m
     WHERE m.room_id = OLD.room_id AND m.reply_to = OLD.reply_to;
    UPDATE public.threads t
       SET reply_count = GREATEST(t.reply_count - 1, 0),
           last_reply_seq = CASE WHEN newest IS NULL THEN t.root_seq ELSE newest END
     WHERE t.room_id = OLD.room_id AND t.root_id = OLD.reply_to
    RETURNING t.last_reply_seq INTO last_seq;
    IF last_seq IS NOT NULL THEN
        UPDATE public.thread_followers f SET thread_seq = last_seq
         WHERE f.room_id = OLD.room_id AND f.root_id = OLD.reply_to
           AND f.thread_seq <> last_seq;
    END IF;
    RETURN NULL;
END
$$;

-- A follower row names its room (written by the application): its root must be a message
-- of that room; the thread's last reply seq is copied from threads (0 while it has none).
CREATE FUNCTION chatkeep_thread_follower_room() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM public.messages m
                    WHERE m.room_id = NEW.room_id AND m.id = NEW.root_id) THEN
        RAISE EXCEPTION 'message % does not exist', NEW.root_id
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'thread_followers_root_id_fkey',
                  TABLE = 'thread_followers';
    END IF;
    NEW.thread_seq := coalesce(
        (SELECT t.last_reply_seq FROM public.threads t
          WHERE t.room_id = NEW.room_id AND t.root_id = NEW.root_id), 0);
    RETURN NEW;
END
$$;

REVOKE EXECUTE ON FUNCTION chatkeep_thread_root() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_record_mentions(uuid, uuid, uuid, bigint, uuid, text)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_message_stored() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_message_edited() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_message_removed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_thread_follower_room() FROM PUBLIC;

-- Badges (015's statement): every count correlated on the room as well, so the whole
-- statement is pushed down to the shards (a join of colocated tables on the room).
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
           CASE WHEN r.last_seq > ru.last_read_seq THEN
               (SELECT count(*) FROM public.message_mentions mm
                 WHERE mm.room_id = ru.room_id AND mm.user_id = acting
                   AND mm.seq > ru.last_read_seq)
               + (SELECT count(*) FROM public.message_mentions mm
                   WHERE mm.room_id = ru.room_id AND mm.user_id IS NULL
                     AND mm.seq > ru.last_read_seq AND mm.author_id <> acting)
           ELSE 0 END,
           th.unread_threads,
           th.thread_mentions
      FROM public.room_users ru
      JOIN public.rooms r ON r.id = ru.room_id
      CROSS JOIN LATERAL (
            SELECT count(*) AS unread_threads,
                   coalesce(sum((SELECT count(*) FROM public.message_mentions mm
                                  WHERE mm.room_id = f.room_id AND mm.root_id = f.root_id
                                    AND mm.user_id = acting
                                    AND mm.seq > f.last_read_seq)), 0)::bigint
                       AS thread_mentions
              FROM public.thread_followers f
             WHERE f.room_id = ru.room_id AND f.user_id = acting AND f.following
               AND f.thread_seq > f.last_read_seq
           ) AS th
     WHERE ru.user_id = acting;
END
$$;
REVOKE EXECUTE ON FUNCTION chatkeep_badges(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_badges(uuid) TO chatapp_app, chatapp_owner;

-- Row security (015's rules, in Citus's form: a per-room function call, no subquery).
ALTER TABLE threads ENABLE ROW LEVEL SECURITY;
ALTER TABLE threads FORCE ROW LEVEL SECURITY;
CREATE POLICY threads_select ON threads FOR SELECT TO chatapp_app
    USING (chatkeep_room_role_at_least(room_id, 'member'));
CREATE POLICY threads_readonly ON threads FOR SELECT TO chatapp_readonly USING (true);
CREATE POLICY threads_system ON threads TO chatapp_owner USING (true) WITH CHECK (true);

ALTER TABLE thread_followers ENABLE ROW LEVEL SECURITY;
ALTER TABLE thread_followers FORCE ROW LEVEL SECURITY;
CREATE POLICY thread_followers_select ON thread_followers FOR SELECT TO chatapp_app
    USING (
        user_id = chatkeep_acting_user_id()
        AND chatkeep_room_role_at_least(room_id, 'member')
    );
CREATE POLICY thread_followers_insert ON thread_followers FOR INSERT TO chatapp_app
    WITH CHECK (
        user_id = chatkeep_acting_user_id()
        AND chatkeep_room_role_at_least(room_id, 'member')
    );
CREATE POLICY thread_followers_update ON thread_followers FOR UPDATE TO chatapp_app
    USING (
        user_id = chatkeep_acting_user_id()
        AND chatkeep_room_role_at_least(room_id, 'member')
    )
    WITH CHECK (user_id = chatkeep_acting_user_id());
CREATE POLICY thread_followers_readonly ON thread_followers FOR SELECT
    TO chatapp_readonly USING (true);
CREATE POLICY thread_followers_system ON thread_followers TO chatapp_owner
    USING (true) WITH CHECK (true);

ALTER TABLE message_mentions ENABLE ROW LEVEL SECURITY;
ALTER TABLE message_mentions FORCE ROW LEVEL SECURITY;
CREATE POLICY message_mentions_select ON message_mentions FOR SELECT TO chatapp_app
    USING (chatkeep_room_role_at_least(room_id, 'member'));
CREATE POLICY message_mentions_readonly ON message_mentions FOR SELECT
    TO chatapp_readonly USING (true);
CREATE POLICY message_mentions_system ON message_mentions TO chatapp_owner
    USING (true) WITH CHECK (true);

GRANT SELECT ON threads, thread_followers, message_mentions TO chatapp_app, chatapp_readonly;
GRANT UPDATE (following, last_read_seq, last_read_at) ON thread_followers TO chatapp_app;

-- Triggers on distributed tables run on the workers; every query they make is keyed by
-- the row's room.
SET LOCAL citus.enable_unsafe_triggers = on;
CREATE TRIGGER thread_followers_room BEFORE INSERT ON thread_followers
    FOR EACH ROW EXECUTE FUNCTION chatkeep_thread_follower_room();

SELECT create_distributed_table('threads', 'room_id', colocate_with => 'rooms');
SELECT create_distributed_table('thread_followers', 'room_id', colocate_with => 'rooms');
SELECT create_distributed_table('message_mentions', 'room_id', colocate_with => 'rooms');

-- The tables are new and empty: the keys are checked at once, with nothing to scan.
-- squawk-ignore adding-foreign-key-constraint
ALTER TABLE threads ADD CONSTRAINT threads_root_id_fkey FOREIGN KEY (room_id, root_id)
    REFERENCES messages (room_id, id) ON DELETE CASCADE;
-- squawk-ignore adding-foreign-key-constraint
ALTER TABLE thread_followers ADD CONSTRAINT thread_followers_root_id_fkey
    FOREIGN KEY (room_id, root_id) REFERENCES messages (room_id, id) ON DELETE CASCADE;
-- squawk-ignore adding-foreign-key-constraint
ALTER TABLE thread_followers ADD CONSTRAINT thread_followers_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE;
-- squawk-ignore adding-foreign-key-constraint
ALTER TABLE message_mentions ADD CONSTRAINT message_mentions_message_id_fkey
    FOREIGN KEY (room_id, message_id) REFERENCES messages (room_id, id) ON DELETE CASCADE;
-- squawk-ignore adding-foreign-key-constraint
ALTER TABLE message_mentions ADD CONSTRAINT message_mentions_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE;

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

-- As 012's part: the shards take a table-wide INSERT (Citus sends them every column); the
-- coordinator's table keeps the column grant, so the application still chooses only the
-- columns it may write (its room, root, own id, follow flag and watermark).
GRANT INSERT ON thread_followers TO chatapp_app;
SET LOCAL citus.enable_ddl_propagation = off;
REVOKE INSERT ON thread_followers FROM chatapp_app;
GRANT INSERT (room_id, root_id, user_id, following, last_read_seq, last_read_at)
    ON thread_followers TO chatapp_app;
SET LOCAL citus.enable_ddl_propagation = on;

-- chatkeep:down
-- PostgreSQL keeps 015's objects: only the comment is put back. On Citus `migrate down`
-- refuses a migration with a Citus part (its tables are distributed: restore a backup).
COMMENT ON COLUMN messages.reply_to IS
    'The root message of the thread this message replies to (same room), or NULL';
