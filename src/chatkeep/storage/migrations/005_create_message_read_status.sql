-- Explicit per-message receipts ("seen by"). Written sparingly: "has X read message M" is
-- answered by the watermark in room_users first; a row here records only a receipt the
-- watermark cannot express, so this table never grows as members x messages.

-- chatkeep:up
CREATE TABLE message_read_status (
    message_id uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    user_id    uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    read_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, user_id)
);

-- chatkeep:down
DROP TABLE message_read_status;
