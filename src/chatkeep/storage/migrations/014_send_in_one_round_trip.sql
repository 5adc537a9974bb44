-- The send path in one round trip, and group commit (issue 12).
--
-- chatkeep_send_messages stores a batch of messages, each as its own sender, in the
-- statement's own transaction: one round trip whether the batch holds one message or
-- sixty-four, and no room row lock is held across a client round trip (the lock the seq
-- trigger takes ends with the statement's commit).
--
-- SECURITY INVOKER: it runs as its caller (chatapp_app), so the row security policies of
-- 009 judge every row exactly as they judge a hand-written INSERT. For each row it sets the
-- acting user with set_config('app.user_id', <sender>, true) and runs the statement the
-- repository sent before (a retried client_msg_id returns the first message; only a
-- member of an active room inserts; the sender's watermark follows their message), then
-- restores the caller's setting. Called inside a transaction already acting as a user, it
-- refuses a row of any other sender (insufficient_privilege): it never widens what the
-- caller's transaction may do.
--
-- Rows are taken in (room id, place in the batch) order: each room's row lock (taken by
-- the seq trigger) is taken in ascending room id order by every batch, so concurrent
-- batches never deadlock, and within a room messages keep the order they were given.
--
-- A row refused by the rules (no such room or one the sender cannot see, not a member,
-- an archived room) raises nothing: it comes back with its outcome and the others are
-- stored. A row that raises (a client_msg_id raced by another transaction, say) fails the
-- whole statement, and the caller then sends each row alone (chatkeep.storage.messages).
--
-- Outcomes: 'sent' (stored now; position is its message.created's room position),
-- 'existing' (a repeated client_msg_id: the first message), 'no_room' (no room the sender
-- can see), 'not_member' (a room they see but are not a member of), 'archived'.

-- chatkeep:up
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

-- chatkeep:down
DROP FUNCTION chatkeep_send_messages(uuid[], uuid[], uuid[], text[], text[], message_type[]);
