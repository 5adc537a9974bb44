-- Indexes for the real queries. Already indexed by their constraints: users by lower(email)
-- and lower(username); messages by (room_id, seq) (history, catch-up, room_id look-ups);
-- room_users by (room_id, user_id) (members of a room); rooms by (direct_user_low, ...).
--
-- Plain CREATE INDEX, not CONCURRENTLY: this file runs right after 001-005 created these
-- tables, so they are empty and the short SHARE lock blocks nobody; CONCURRENTLY cannot run
-- in a transaction, so it would cost this file its all-or-nothing guarantee for no gain.
-- An index added later to a live table goes in a `-- chatkeep:no-transaction` file,
-- CONCURRENTLY.
-- squawk-ignore-file require-concurrent-index-creation

-- chatkeep:up
-- Rooms of a user, with the watermark read straight from the index for unread counts.
CREATE INDEX room_users_user_id_idx ON room_users (user_id, room_id)
    INCLUDE (role, last_read_seq);

-- Foreign keys that no constraint indexes yet: cascading deletes and "by author" look-ups.
CREATE INDEX messages_user_id_idx ON messages (user_id);
CREATE INDEX rooms_created_by_idx ON rooms (created_by);
CREATE INDEX rooms_direct_user_high_idx ON rooms (direct_user_high)
    WHERE direct_user_high IS NOT NULL;
CREATE INDEX message_read_status_user_id_idx ON message_read_status (user_id);

-- messages.created_at is appended in time order, so a BRIN index answers time-range scans
-- (retention, exports) at a tiny fraction of a B-tree's size and write cost.
CREATE INDEX messages_created_at_idx ON messages USING brin (created_at);

-- Partial indexes where queries filter: active users by name, active public rooms.
CREATE INDEX users_active_username_idx ON users (lower(username)) WHERE is_active;
CREATE INDEX rooms_active_public_idx ON rooms (created_at DESC)
    WHERE is_active AND type = 'public';

-- chatkeep:down
DROP INDEX rooms_active_public_idx;
DROP INDEX users_active_username_idx;
DROP INDEX messages_created_at_idx;
DROP INDEX message_read_status_user_id_idx;
DROP INDEX rooms_direct_user_high_idx;
DROP INDEX rooms_created_by_idx;
DROP INDEX messages_user_id_idx;
DROP INDEX room_users_user_id_idx;
