-- Membership and read state. Read state is a watermark (last_read_seq, last_read_at) that
-- only moves forward: marking a room read is one row update, and the unread count is
-- rooms.last_seq - room_users.last_read_seq, with no COUNT over messages.

-- chatkeep:up
CREATE TYPE room_role AS ENUM ('owner', 'admin', 'member');

CREATE TABLE room_users (
    room_id       uuid        NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id       uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role          room_role   NOT NULL DEFAULT 'member',
    joined_at     timestamptz NOT NULL DEFAULT now(),
    last_read_at  timestamptz,
    last_read_seq bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (room_id, user_id),
    CONSTRAINT room_users_last_read_seq_check CHECK (last_read_seq >= 0)
);

-- chatkeep:down
DROP TABLE room_users;
DROP TYPE room_role;
