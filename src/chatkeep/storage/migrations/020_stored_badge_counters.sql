-- Badges from stored counters (issue 14, item 3; issue 12, unread in one round trip).
--
-- 015's chatkeep_badges counted, per room of the user, their unread mentions and the room
-- mentions (two index probes), then per unread followed thread its unread mentions (one
-- more probe each): about 2,500 sub-plan runs for a user in 500 rooms, 14 ms p50. Here
-- the exact counts are kept as they change, by triggers, so the read is one pass over the
-- user's memberships and one range of their unread followed threads:
--
-- * room_users.unread_mentions: the member's mentions in the room after their watermark.
--   A stored mention of the member after it adds one; a mention that goes (an edit that
--   drops the name, a deleted message) takes one off; a watermark that moves recounts
--   (one index range of the member's mentions after the new watermark), and only when the
--   count was not 0 already: a sender with nothing unread pays nothing for their own
--   watermark moving. A new membership counts what is there (a member who left and comes
--   back keeps their mentions).
-- * thread_followers.unread_mentions: the same per follower and thread, after the thread
--   watermark; the unread followed threads of a user are a partial index
--   (following AND thread_seq > last_read_seq), read whole in one range by user.
-- * room_mention_heads: per room, the seq of its latest `@room` mention. Room mentions
--   are not counted per member (that would be one write per member per message, what
--   issue 14 forbids); the badge probes a room's room mentions only when one is newer
--   than the member's watermark, so most rooms cost nothing.
--
-- The counters move under the same locks as what they count: a mention is stored with
-- the room row locked (the seq trigger), and a watermark moves with its row locked; the
-- recount of a moving watermark runs after the row lock is taken, so it sees a mention
-- committed meanwhile, and a mention committed after it finds the new watermark (READ
-- COMMITTED re-checks the row). tests/test_badge_counters.py compares them with a direct
-- count after edits, deletes, reads, leaving and joining, and concurrent sends and reads.
--
-- chatkeep_unread(acting) is the one-round-trip read of both unread_counts and badges:
-- it sets the acting user for its statement's own transaction (chatkeep_act_as, 013) and
-- reads that user's rows only; 015's chatkeep_badges (for a transaction already acting as
-- the user) returns the same rows.
--
-- Citus: none of this applies (threads and mentions are not distributed; docs/scaling.md);
-- unread_counts keeps its statement there.

-- chatkeep:up
-- chatkeep:plain-only
-- Constant defaults: no table rewrite (PostgreSQL 11+), a catalog change only.
ALTER TABLE room_users ADD COLUMN unread_mentions bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN room_users.unread_mentions IS
    'Mentions of the member in the room after last_read_seq, kept by triggers (020)';
ALTER TABLE thread_followers ADD COLUMN unread_mentions bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN thread_followers.unread_mentions IS
    'Mentions of the follower in the thread after last_read_seq, kept by triggers (020)';

-- The user's memberships with their read state and mention count from the index alone
-- (006's index plus unread_mentions; the same name afterwards). A mention's counter update
-- is then not a HOT update, as a watermark move already was not (last_read_seq is in the
-- index): mentions are sparse. On a large live room_users, build it first with
-- CREATE INDEX CONCURRENTLY under this name: the migration then finds it (IF NOT EXISTS).
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX IF NOT EXISTS room_users_user_badge_idx ON room_users (user_id, room_id)
    INCLUDE (role, last_read_seq, unread_mentions);
-- A catalog change once the new index is there (a brief exclusive lock of room_users).
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX room_users_user_id_idx;
-- No client names the index; docs and tests keep knowing it by 006's name.
-- squawk-ignore renaming-object
ALTER INDEX room_users_user_badge_idx RENAME TO room_users_user_id_idx;

CREATE TABLE room_mention_heads (
    room_id  uuid   PRIMARY KEY REFERENCES rooms (id) ON DELETE CASCADE,
    last_seq bigint NOT NULL
);
COMMENT ON TABLE room_mention_heads IS
    'Per room: the seq of its latest room mention (@room), kept by triggers (020)';

-- The user's unread followed threads: exactly the rows a badge counts, and nothing else.
-- A small table (followers, not messages), new rows only for threads.
-- squawk-ignore require-concurrent-index-creation
CREATE INDEX thread_followers_unread_idx ON thread_followers (user_id, room_id)
    INCLUDE (unread_mentions)
    WHERE following AND thread_seq > last_read_seq;

-- The counts as of now (the triggers below keep them from here on).
UPDATE room_users ru SET unread_mentions = c.n
  FROM (SELECT mm.room_id, mm.user_id, count(*) AS n
          FROM message_mentions mm
          JOIN room_users x ON x.room_id = mm.room_id AND x.user_id = mm.user_id
         WHERE mm.user_id IS NOT NULL AND mm.seq > x.last_read_seq
         GROUP BY mm.room_id, mm.user_id) AS c
 WHERE ru.room_id = c.room_id AND ru.user_id = c.user_id;
UPDATE thread_followers f SET unread_mentions = c.n
  FROM (SELECT mm.root_id, mm.user_id, count(*) AS n
          FROM message_mentions mm
          JOIN thread_followers x ON x.root_id = mm.root_id AND x.user_id = mm.user_id
         WHERE mm.user_id IS NOT NULL AND mm.root_id IS NOT NULL
           AND mm.seq > x.last_read_seq
         GROUP BY mm.root_id, mm.user_id) AS c
 WHERE f.root_id = c.root_id AND f.user_id = c.user_id;
INSERT INTO room_mention_heads (room_id, last_seq)
SELECT mm.room_id, max(mm.seq) FROM message_mentions mm
 WHERE mm.user_id IS NULL
 GROUP BY mm.room_id;

-- A mention stored: count it for the member (room and thread) when it is after their
-- watermarks, or move the room's room-mention head.
CREATE FUNCTION chatkeep_mention_added() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.user_id IS NULL THEN
        INSERT INTO public.room_mention_heads AS h (room_id, last_seq)
        VALUES (NEW.room_id, NEW.seq)
        ON CONFLICT (room_id) DO UPDATE SET last_seq = EXCLUDED.last_seq
         WHERE h.last_seq < EXCLUDED.last_seq;
        RETURN NULL;
    END IF;
    UPDATE public.room_users SET unread_mentions = unread_mentions + 1
     WHERE room_id = NEW.room_id AND user_id = NEW.user_id AND last_read_seq < NEW.seq;
    IF NEW.root_id IS NOT NULL THEN
        UPDATE public.thread_followers SET unread_mentions = unread_mentions + 1
         WHERE root_id = NEW.root_id AND user_id = NEW.user_id AND last_read_seq < NEW.seq;
    END IF;
    RETURN NULL;
END
$$;

-- A mention gone (an edit re-resolves a message's mentions; a deleted message takes its
-- mentions by cascade): uncount it where it was counted. The room head stays: it only
-- lets the badge look, and the look counts what is there.
CREATE FUNCTION chatkeep_mention_removed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE public.room_users SET unread_mentions = unread_mentions - 1
     WHERE room_id = OLD.room_id AND user_id = OLD.user_id AND last_read_seq < OLD.seq
       AND unread_mentions > 0;
    IF OLD.root_id IS NOT NULL THEN
        UPDATE public.thread_followers SET unread_mentions = unread_mentions - 1
         WHERE root_id = OLD.root_id AND user_id = OLD.user_id AND last_read_seq < OLD.seq
           AND unread_mentions > 0;
    END IF;
    RETURN NULL;
END
$$;

-- A room watermark set (a new membership) or moved: recount the member's mentions after it.
CREATE FUNCTION chatkeep_member_mentions_recount() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW.unread_mentions := (
        SELECT count(*) FROM public.message_mentions mm
         WHERE mm.user_id = NEW.user_id AND mm.room_id = NEW.room_id
           AND mm.seq > NEW.last_read_seq);
    RETURN NEW;
END
$$;

-- A thread watermark set (a new follower row) or moved: recount the follower's mentions.
CREATE FUNCTION chatkeep_follower_mentions_recount() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW.unread_mentions := (
        SELECT count(*) FROM public.message_mentions mm
         WHERE mm.root_id = NEW.root_id AND mm.user_id = NEW.user_id
           AND mm.seq > NEW.last_read_seq);
    RETURN NEW;
END
$$;

REVOKE EXECUTE ON FUNCTION chatkeep_mention_added() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_mention_removed() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_member_mentions_recount() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_follower_mentions_recount() FROM PUBLIC;

CREATE TRIGGER message_mentions_counted AFTER INSERT ON message_mentions
    FOR EACH ROW EXECUTE FUNCTION chatkeep_mention_added();
CREATE TRIGGER message_mentions_uncounted AFTER DELETE ON message_mentions
    FOR EACH ROW WHEN (OLD.user_id IS NOT NULL)
    EXECUTE FUNCTION chatkeep_mention_removed();
-- Named to fire after room_users_guard (BEFORE triggers fire in name order).
CREATE TRIGGER room_users_unread_mentions_joined BEFORE INSERT ON room_users
    FOR EACH ROW EXECUTE FUNCTION chatkeep_member_mentions_recount();
CREATE TRIGGER room_users_unread_mentions_read BEFORE UPDATE OF last_read_seq ON room_users
    FOR EACH ROW
    WHEN (NEW.last_read_seq <> OLD.last_read_seq
          AND (OLD.unread_mentions > 0 OR NEW.last_read_seq < OLD.last_read_seq))
    EXECUTE FUNCTION chatkeep_member_mentions_recount();
-- After thread_followers_room (015), which sets the row's room and thread_seq.
CREATE TRIGGER thread_followers_unread_mentions_new BEFORE INSERT ON thread_followers
    FOR EACH ROW EXECUTE FUNCTION chatkeep_follower_mentions_recount();
CREATE TRIGGER thread_followers_unread_mentions_read
    BEFORE UPDATE OF last_read_seq ON thread_followers
    FOR EACH ROW
    WHEN (NEW.last_read_seq <> OLD.last_read_seq
          AND (OLD.unread_mentions > 0 OR NEW.last_read_seq < OLD.last_read_seq))
    EXECUTE FUNCTION chatkeep_follower_mentions_recount();

-- Nobody but the triggers writes the heads; the badge function reads them as the definer.
ALTER TABLE room_mention_heads ENABLE ROW LEVEL SECURITY;
ALTER TABLE room_mention_heads FORCE ROW LEVEL SECURITY;
CREATE POLICY room_mention_heads_readonly ON room_mention_heads FOR SELECT
    TO chatapp_readonly USING (true);
CREATE POLICY room_mention_heads_system ON room_mention_heads TO chatapp_owner
    USING (true) WITH CHECK (true);
GRANT SELECT ON room_mention_heads TO chatapp_readonly;

-- Badges in one round trip: act as the user for this statement's own transaction
-- (as chatkeep_act_as of 013 does: it refuses a transaction already acting as someone
-- else), then per
-- room of theirs: unread (the subtraction), mentions (the stored count, plus the room
-- mentions by someone else after the watermark, looked for only when the room's head is
-- past it), unread followed threads and their unread mentions (one range of
-- thread_followers_unread_idx for all the user's rooms, joined by room). SECURITY DEFINER:
-- it reads only the acting user's rows, so it needs no row policy and skips their per-row
-- cost (as 015's chatkeep_badges did).
CREATE FUNCTION chatkeep_unread(acting uuid)
RETURNS TABLE (room_id uuid, unread bigint, mentions bigint, unread_threads bigint,
               thread_mentions bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current_user_id uuid := nullif(current_setting('app.user_id', true), '')::uuid;
BEGIN
    -- chatkeep_act_as (013), inline: one function call fewer on every read.
    IF acting IS NULL THEN
        RAISE EXCEPTION 'an acting user is required'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF current_user_id IS NOT NULL AND current_user_id <> acting THEN
        RAISE EXCEPTION 'this transaction already acts as another user'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    PERFORM set_config('app.user_id', acting::text, true);
    RETURN QUERY
    SELECT ru.room_id,
           GREATEST(r.last_seq - ru.last_read_seq, 0),
           ru.unread_mentions
           + CASE WHEN h.last_seq > ru.last_read_seq THEN
                 (SELECT count(*) FROM public.message_mentions mm
                   WHERE mm.user_id IS NULL AND mm.room_id = ru.room_id
                     AND mm.seq > ru.last_read_seq AND mm.author_id <> acting)
             ELSE 0 END,
           coalesce(th.unread_threads, 0),
           coalesce(th.thread_mentions, 0)
      FROM public.room_users ru
      JOIN public.rooms r ON r.id = ru.room_id
      LEFT JOIN public.room_mention_heads h ON h.room_id = ru.room_id
      LEFT JOIN (
            SELECT f.room_id, count(*) AS unread_threads,
                   sum(f.unread_mentions)::bigint AS thread_mentions
              FROM public.thread_followers f
             WHERE f.user_id = acting AND f.following AND f.thread_seq > f.last_read_seq
             GROUP BY f.room_id
           ) AS th ON th.room_id = ru.room_id
     WHERE ru.user_id = acting;
END
$$;
REVOKE EXECUTE ON FUNCTION chatkeep_unread(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_unread(uuid) TO chatapp_app, chatapp_owner;

-- 015's entry point (same signature and rows), for a transaction already acting as the
-- user: the same statement.
CREATE OR REPLACE FUNCTION chatkeep_badges(for_user uuid)
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
    RETURN QUERY SELECT * FROM public.chatkeep_unread(for_user);
END
$$;
-- chatkeep:end-plain-only

-- chatkeep:citus
-- Nothing on Citus: threads, mentions and badges are not distributed there (015), and
-- unread_counts keeps its plain statement (docs/design.md, "Citus mode").

-- chatkeep:down
-- Only where the up part ran (plain PostgreSQL: on Citus none of it exists).
DO $down$
BEGIN
    IF to_regclass('public.room_mention_heads') IS NULL THEN
        RETURN;
    END IF;
    DROP FUNCTION chatkeep_unread(uuid);
    DROP TRIGGER thread_followers_unread_mentions_read ON thread_followers;
    DROP TRIGGER thread_followers_unread_mentions_new ON thread_followers;
    DROP TRIGGER room_users_unread_mentions_read ON room_users;
    DROP TRIGGER room_users_unread_mentions_joined ON room_users;
    DROP TRIGGER message_mentions_uncounted ON message_mentions;
    DROP TRIGGER message_mentions_counted ON message_mentions;
    DROP FUNCTION chatkeep_follower_mentions_recount();
    DROP FUNCTION chatkeep_member_mentions_recount();
    DROP FUNCTION chatkeep_mention_removed();
    DROP FUNCTION chatkeep_mention_added();
    DROP TABLE room_mention_heads;
    DROP INDEX thread_followers_unread_idx;
    CREATE INDEX room_users_user_read_idx ON room_users (user_id, room_id)
        INCLUDE (role, last_read_seq);
    DROP INDEX room_users_user_id_idx;
    ALTER INDEX room_users_user_read_idx RENAME TO room_users_user_id_idx;
    ALTER TABLE thread_followers DROP COLUMN unread_mentions;
    ALTER TABLE room_users DROP COLUMN unread_mentions;
    -- 015's badges, probing per room and per unread thread (its text exactly, unindented).
    EXECUTE $restore$
CREATE OR REPLACE FUNCTION chatkeep_badges(for_user uuid)
RETURNS TABLE (room_id uuid, unread bigint, mentions bigint, unread_threads bigint,
               thread_mentions bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
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
$body$
    $restore$;
END
$down$;
