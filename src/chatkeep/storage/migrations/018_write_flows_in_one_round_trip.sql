-- The write flows of messages, reactions and threads in one round trip (issue 12, item 1).
--
-- edit_message, delete_message, react / unreact, mark_thread_read and follow_thread /
-- unfollow_thread each paid BEGIN + set_config, their statements (the write, then a read of
-- the position the change log gave it; delete looked the message up first), COMMIT: three
-- to five round trips, and the room row lock the log's trigger takes was held across the
-- COMMIT's. Each is now one function, as
-- 013's read flows are: SECURITY INVOKER (the default: the policies of 009/013/015 bind it
-- as the caller, chatapp_app), starting with chatkeep_act_as(acting), which sets the acting
-- user local to the statement's own implicit transaction. The body is the repository's
-- statement (storage/messages.py, reactions.py, threads.py) with the acting user as its
-- first argument, followed in the same function by what the flow read back in its
-- transaction (the change log's position, or the logged change), and by the one look-up
-- that tells the caller why nothing was written (no such message for this user, or not
-- theirs to change): every answer the flow gave before, in one round trip.
--
-- Plain PostgreSQL only: on Citus a function's set_config does not reach the workers, so
-- these flows keep their transaction there (ChatKeep checks Settings.citus), and nothing
-- of this migration applies (an empty Citus part).

-- chatkeep:up
-- chatkeep:plain-only
-- Edit the acting user's own message (messages.py, EDIT). outcome: 'edited' (with the
-- message and the position of its message.edited change), 'not_author' (the user sees
-- the message but did not write it) or 'missing' (no such message for this user).
CREATE FUNCTION chatkeep_edit_message(acting uuid, target uuid, body text)
RETURNS TABLE (
    outcome text, id uuid, room_id uuid, user_id uuid, seq bigint, client_msg_id text,
    content text, type message_type, is_edited boolean, edited_at timestamptz,
    created_at timestamptz, reply_to uuid, "position" bigint
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    UPDATE messages m
       SET content = chatkeep_edit_message.body, is_edited = true, edited_at = now()
     WHERE m.id = chatkeep_edit_message.target AND m.user_id = chatkeep_edit_message.acting
    RETURNING m.id, m.room_id, m.user_id, m.seq, m.client_msg_id, m.content, m.type,
              m.is_edited, m.edited_at, m.created_at, m.reply_to
         INTO id, room_id, user_id, seq, client_msg_id, content, type, is_edited, edited_at,
              created_at, reply_to;
    IF FOUND THEN
        outcome := 'edited';
        "position" := nullif(current_setting('chatkeep.position', true), '')::bigint;
    ELSIF EXISTS (SELECT 1 FROM messages m WHERE m.id = chatkeep_edit_message.target) THEN
        outcome := 'not_author';
    ELSE
        outcome := 'missing';
    END IF;
    RETURN NEXT;
END
$$;

-- Delete a message as its author or an owner/admin of its room (messages.py, DELETE_AS).
-- outcome: 'deleted' (with the room, seq and the position of its message.deleted change),
-- 'denied' (the user sees it but may not delete it) or 'missing'.
CREATE FUNCTION chatkeep_delete_message(acting uuid, target uuid)
RETURNS TABLE (outcome text, room_id uuid, seq bigint, "position" bigint)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    DELETE FROM messages m
     WHERE m.id = chatkeep_delete_message.target
       AND (m.user_id = chatkeep_delete_message.acting
            OR EXISTS (SELECT 1 FROM room_users ru
                        WHERE ru.room_id = m.room_id
                          AND ru.user_id = chatkeep_delete_message.acting
                          AND ru.role IN ('owner', 'admin')))
    RETURNING m.room_id, m.seq INTO room_id, seq;
    IF FOUND THEN
        outcome := 'deleted';
        "position" := nullif(current_setting('chatkeep.position', true), '')::bigint;
    ELSIF EXISTS (SELECT 1 FROM messages m WHERE m.id = chatkeep_delete_message.target) THEN
        outcome := 'denied';
    ELSE
        outcome := 'missing';
    END IF;
    RETURN NEXT;
END
$$;

-- Add (adding) or take back the acting user's reaction (reactions.py, REACT / UNREACT: the
-- same statements). visible: the user sees the message; changed: a row was written. When
-- changed, the change the log's trigger recorded (changes.py, LAST_CHANGE), whose data
-- holds the emoji's resulting count.
CREATE FUNCTION chatkeep_react(acting uuid, target uuid, reaction text, adding boolean)
RETURNS TABLE (
    visible boolean, changed boolean, "position" bigint, kind text, occurred_at timestamptz,
    actor_id uuid, message_id uuid, seq bigint, data jsonb, room_id uuid
)
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_column
BEGIN
    PERFORM chatkeep_act_as(acting);
    IF chatkeep_react.adding THEN
        WITH m AS (
            SELECT x.id FROM messages x WHERE x.id = chatkeep_react.target
        ), added AS (
            INSERT INTO message_reactions (message_id, emoji, user_id)
            SELECT m.id, chatkeep_react.reaction, chatkeep_react.acting FROM m
            ON CONFLICT (message_id, emoji, user_id) DO NOTHING
            RETURNING 1
        )
        SELECT EXISTS (SELECT 1 FROM m), EXISTS (SELECT 1 FROM added) INTO visible, changed;
    ELSE
        WITH m AS (
            SELECT x.id FROM messages x WHERE x.id = chatkeep_react.target
        ), removed AS (
            DELETE FROM message_reactions r
             USING m
             WHERE r.message_id = m.id AND r.emoji = chatkeep_react.reaction
               AND r.user_id = chatkeep_react.acting
            RETURNING 1
        )
        SELECT EXISTS (SELECT 1 FROM m), EXISTS (SELECT 1 FROM removed) INTO visible, changed;
    END IF;
    IF changed THEN
        SELECT c.position, c.kind, c.occurred_at, c.actor_id, c.message_id, c.seq, c.data,
               c.room_id
          INTO "position", kind, occurred_at, actor_id, message_id, seq, data, room_id
          FROM room_changes c
         WHERE c.room_id = nullif(current_setting('chatkeep.room', true), '')::uuid
           AND c.position = nullif(current_setting('chatkeep.position', true), '')::bigint;
    END IF;
    RETURN NEXT;
END
$$;

-- Move the acting user's watermark in a thread to its last reply (threads.py,
-- MARK_THREAD_READ). NULL: no such message for this user.
CREATE FUNCTION chatkeep_mark_thread_read(acting uuid, target uuid) RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    watermark bigint;
BEGIN
    PERFORM chatkeep_act_as(acting);
    WITH root AS (
        SELECT coalesce(m.reply_to, m.id) AS id
          FROM messages m WHERE m.id = chatkeep_mark_thread_read.target
    ), goal AS (
        SELECT root.id, coalesce(t.last_reply_seq, 0) AS seq
          FROM root LEFT JOIN threads t ON t.root_id = root.id
    ), marked AS (
        INSERT INTO thread_followers AS f
               (root_id, user_id, following, last_read_seq, last_read_at)
        SELECT goal.id, chatkeep_mark_thread_read.acting, false, goal.seq, now() FROM goal
        ON CONFLICT (root_id, user_id) DO UPDATE
           SET last_read_seq = GREATEST(f.last_read_seq, EXCLUDED.last_read_seq),
               last_read_at = CASE WHEN EXCLUDED.last_read_seq > f.last_read_seq
                                   THEN EXCLUDED.last_read_at ELSE f.last_read_at END
        RETURNING f.last_read_seq
    )
    SELECT (SELECT marked.last_read_seq FROM marked) INTO watermark;
    RETURN watermark;
END
$$;

-- Follow (follow) or stop following the thread of a message (threads.py, FOLLOW). False:
-- no such message for this user.
CREATE FUNCTION chatkeep_follow_thread(acting uuid, target uuid, follow boolean)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    found_root boolean;
BEGIN
    PERFORM chatkeep_act_as(acting);
    WITH root AS (
        SELECT coalesce(m.reply_to, m.id) AS id
          FROM messages m WHERE m.id = chatkeep_follow_thread.target
    ), goal AS (
        SELECT root.id, coalesce(t.last_reply_seq, 0) AS seq
          FROM root LEFT JOIN threads t ON t.root_id = root.id
    ), changed AS (
        INSERT INTO thread_followers AS f
               (root_id, user_id, following, last_read_seq, last_read_at)
        SELECT goal.id, chatkeep_follow_thread.acting, chatkeep_follow_thread.follow,
               goal.seq, now()
          FROM goal
        ON CONFLICT (root_id, user_id) DO UPDATE SET following = EXCLUDED.following
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM changed) INTO found_root;
    RETURN found_root;
END
$$;

COMMENT ON FUNCTION chatkeep_edit_message(uuid, uuid, text)
    IS 'Edit the acting user''s own message and return it with its change-log position';
COMMENT ON FUNCTION chatkeep_delete_message(uuid, uuid)
    IS 'Delete a message as its author or a room owner/admin; its room, seq and position';
COMMENT ON FUNCTION chatkeep_react(uuid, uuid, text, boolean)
    IS 'Add or take back the acting user''s reaction and return the change it logged';
COMMENT ON FUNCTION chatkeep_mark_thread_read(uuid, uuid)
    IS 'Move the acting user''s thread watermark to the thread''s last reply';
COMMENT ON FUNCTION chatkeep_follow_thread(uuid, uuid, boolean)
    IS 'Follow or unfollow a thread as the acting user';

REVOKE EXECUTE ON FUNCTION chatkeep_edit_message(uuid, uuid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_delete_message(uuid, uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_react(uuid, uuid, text, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_mark_thread_read(uuid, uuid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chatkeep_follow_thread(uuid, uuid, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chatkeep_edit_message(uuid, uuid, text) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_delete_message(uuid, uuid) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_react(uuid, uuid, text, boolean)
    TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_mark_thread_read(uuid, uuid) TO chatapp_app, chatapp_owner;
GRANT EXECUTE ON FUNCTION chatkeep_follow_thread(uuid, uuid, boolean)
    TO chatapp_app, chatapp_owner;
-- chatkeep:end-plain-only

-- chatkeep:citus
-- On Citus (docs/design.md, "Citus mode") a function's set_config never reaches the
-- workers, so these flows keep their transaction acting as the user there. Nothing of
-- this migration applies.

-- chatkeep:down
DROP FUNCTION IF EXISTS chatkeep_follow_thread(uuid, uuid, boolean);
DROP FUNCTION IF EXISTS chatkeep_mark_thread_read(uuid, uuid);
DROP FUNCTION IF EXISTS chatkeep_react(uuid, uuid, text, boolean);
DROP FUNCTION IF EXISTS chatkeep_delete_message(uuid, uuid);
DROP FUNCTION IF EXISTS chatkeep_edit_message(uuid, uuid, text);
