-- Row security that costs the same for a user in ten rooms and in a thousand (issue 12).
--
-- 009's policies tested membership as `room_id = ANY ((SELECT chatkeep_acting_rooms(..)))`:
-- the array is built once per statement (an InitPlan), but PostgreSQL hashes `= ANY` only
-- for a constant array, so each filtered row scanned the acting user's whole room list. A
-- statement that filters a row per room (unread counts, a member list, rooms the user can
-- see) cost rows x rooms comparisons: for a user in 1,000 private rooms, milliseconds.
--
-- Here every such test becomes `room_id IN (SELECT unnest(chatkeep_acting_rooms(..)))`,
-- the same set under the same definer function, so the answer is the same for every row
-- (no NULLs either way: the function returns '{}' rather than NULL, and ids are NOT NULL).
-- The planner makes it a SubPlan over an uncorrelated sub-select: hashed when the
-- statement filters many rows (one hash table per statement, one probe per row), or
-- materialised once and scanned when it filters a few. Either way the function runs at
-- most once per clause and statement, as before.
--
-- The room_users guard trigger no longer fires for the acting user's own row: it allowed
-- those unconditionally (own read state; the policies cap a role change), so the WHEN
-- clause skips a PL/pgSQL call on every send and mark-read without changing an answer.

-- chatkeep:up
ALTER POLICY rooms_select ON rooms
    USING (
        type = 'public'
        OR id IN (SELECT unnest(chatkeep_acting_rooms('member')))
        OR created_by = (SELECT chatkeep_acting_user_id())
        OR direct_user_low = (SELECT chatkeep_acting_user_id())
        OR direct_user_high = (SELECT chatkeep_acting_user_id())
    );
ALTER POLICY rooms_update ON rooms
    USING (
        type = 'public'
        OR id IN (SELECT unnest(chatkeep_acting_rooms('member')))
    )
    WITH CHECK (id IN (SELECT unnest(chatkeep_acting_rooms('member'))));
ALTER POLICY rooms_delete ON rooms
    USING (
        type = 'public'
        OR id IN (SELECT unnest(chatkeep_acting_rooms('member')))
    );

ALTER POLICY room_users_select ON room_users
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR room_id IN (SELECT unnest(chatkeep_acting_rooms('member')))
    );
ALTER POLICY room_users_insert ON room_users
    WITH CHECK (
        (user_id = (SELECT chatkeep_acting_user_id())
         AND role = 'member'
         AND EXISTS (SELECT 1 FROM rooms r
                      WHERE r.id = room_users.room_id AND r.type = 'public'))
        OR (user_id = (SELECT chatkeep_acting_user_id())
            AND role = 'owner'
            AND EXISTS (SELECT 1 FROM rooms r
                         WHERE r.id = room_users.room_id
                           AND r.created_by = (SELECT chatkeep_acting_user_id()))
            AND chatkeep_room_is_empty(room_id))
        OR EXISTS (SELECT 1 FROM rooms r
                    WHERE r.id = room_users.room_id AND r.type = 'direct'
                      AND (SELECT chatkeep_acting_user_id())
                          IN (r.direct_user_low, r.direct_user_high)
                      AND room_users.user_id IN (r.direct_user_low, r.direct_user_high))
        OR (room_id IN (SELECT unnest(chatkeep_acting_rooms('admin')))
            AND (role <> 'owner'
                 OR room_id IN (SELECT unnest(chatkeep_acting_rooms('owner'))))
            AND EXISTS (SELECT 1 FROM rooms r
                         WHERE r.id = room_users.room_id AND r.type <> 'direct'))
    );
ALTER POLICY room_users_update ON room_users
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR room_id IN (SELECT unnest(chatkeep_acting_rooms('member')))
    )
    WITH CHECK (
        (user_id = (SELECT chatkeep_acting_user_id())
         OR room_id IN (SELECT unnest(chatkeep_acting_rooms('admin'))))
        AND (role = 'member'
             OR (role = 'admin'
                 AND room_id IN (SELECT unnest(chatkeep_acting_rooms('admin'))))
             OR (role = 'owner'
                 AND room_id IN (SELECT unnest(chatkeep_acting_rooms('owner')))))
    );
ALTER POLICY room_users_delete ON room_users
    USING (
        user_id = (SELECT chatkeep_acting_user_id())
        OR room_id IN (SELECT unnest(chatkeep_acting_rooms('member')))
    );

ALTER POLICY messages_select ON messages
    USING (room_id IN (SELECT unnest(chatkeep_acting_rooms('member'))));
ALTER POLICY messages_insert ON messages
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id IN (SELECT unnest(chatkeep_acting_rooms('member')))
    );
ALTER POLICY messages_update ON messages
    USING (room_id IN (SELECT unnest(chatkeep_acting_rooms('member'))))
    WITH CHECK (
        user_id = (SELECT chatkeep_acting_user_id())
        AND room_id IN (SELECT unnest(chatkeep_acting_rooms('member')))
    );
ALTER POLICY messages_delete ON messages
    USING (room_id IN (SELECT unnest(chatkeep_acting_rooms('member'))));

-- The guard's answer for the acting user's own row is always "allowed" (009).
CREATE OR REPLACE TRIGGER room_users_guard BEFORE UPDATE OR DELETE ON room_users
    FOR EACH ROW
    WHEN (OLD.user_id IS DISTINCT FROM chatkeep_acting_user_id())
    EXECUTE FUNCTION chatkeep_guard();

-- chatkeep:down
CREATE OR REPLACE TRIGGER room_users_guard BEFORE UPDATE OR DELETE ON room_users
    FOR EACH ROW EXECUTE FUNCTION chatkeep_guard();

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
    )
    WITH CHECK (
        (user_id = (SELECT chatkeep_acting_user_id())
         OR room_id = ANY ((SELECT chatkeep_acting_rooms('admin'))::uuid[]))
        AND (role = 'member'
             OR (role = 'admin'
                 AND room_id = ANY ((SELECT chatkeep_acting_rooms('admin'))::uuid[]))
             OR (role = 'owner'
                 AND room_id = ANY ((SELECT chatkeep_acting_rooms('owner'))::uuid[])))
    );
ALTER POLICY room_users_insert ON room_users
    WITH CHECK (
        (user_id = (SELECT chatkeep_acting_user_id())
         AND role = 'member'
         AND EXISTS (SELECT 1 FROM rooms r
                      WHERE r.id = room_users.room_id AND r.type = 'public'))
        OR (user_id = (SELECT chatkeep_acting_user_id())
            AND role = 'owner'
            AND EXISTS (SELECT 1 FROM rooms r
                         WHERE r.id = room_users.room_id
                           AND r.created_by = (SELECT chatkeep_acting_user_id()))
            AND chatkeep_room_is_empty(room_id))
        OR EXISTS (SELECT 1 FROM rooms r
                    WHERE r.id = room_users.room_id AND r.type = 'direct'
                      AND (SELECT chatkeep_acting_user_id())
                          IN (r.direct_user_low, r.direct_user_high)
                      AND room_users.user_id IN (r.direct_user_low, r.direct_user_high))
        OR (room_id = ANY ((SELECT chatkeep_acting_rooms('admin'))::uuid[])
            AND (role <> 'owner' OR room_id = ANY ((SELECT chatkeep_acting_rooms('owner'))::uuid[]))
            AND EXISTS (SELECT 1 FROM rooms r
                         WHERE r.id = room_users.room_id AND r.type <> 'direct'))
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
