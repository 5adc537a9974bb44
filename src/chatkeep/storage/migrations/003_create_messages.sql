-- Messages. seq is gapless per room and in commit order (allocated from rooms.last_seq
-- under the room row lock); (room_id, seq) is both the uniqueness rule and the index every
-- history page reads. client_msg_id makes a retried send return the first message.

-- chatkeep:up
CREATE TYPE message_type AS ENUM ('text', 'image', 'file', 'system');

CREATE TABLE messages (
    id            uuid         PRIMARY KEY DEFAULT chatkeep_uuidv7(),
    room_id       uuid         NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id       uuid         NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    seq           bigint       NOT NULL,
    client_msg_id text,
    content       text         NOT NULL,
    type          message_type NOT NULL DEFAULT 'text',
    is_edited     boolean      NOT NULL DEFAULT false,
    edited_at     timestamptz,
    created_at    timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT messages_seq_check CHECK (seq > 0),
    CONSTRAINT messages_content_check
        CHECK (char_length(content) BETWEEN 1 AND 10000 AND btrim(content, E' \t\r\n') <> ''),
    CONSTRAINT messages_client_msg_id_check
        CHECK (client_msg_id IS NULL OR char_length(client_msg_id) BETWEEN 1 AND 64),
    CONSTRAINT messages_edited_check CHECK (is_edited = (edited_at IS NOT NULL)),
    CONSTRAINT messages_room_seq_key UNIQUE (room_id, seq),
    CONSTRAINT messages_client_msg_id_key UNIQUE (room_id, user_id, client_msg_id)
);

-- chatkeep:down
DROP TABLE messages;
DROP TYPE message_type;
