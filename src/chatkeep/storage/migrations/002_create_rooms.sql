-- Rooms: public, private, and direct (two people). A direct room is unique per unordered
-- pair of users, enforced here, so two concurrent "open a DM" calls find the same room.

-- chatkeep:up
CREATE TYPE room_type AS ENUM ('public', 'private', 'direct');

CREATE TABLE rooms (
    id               uuid        PRIMARY KEY DEFAULT chatkeep_uuidv7(),
    name             text        NOT NULL,
    description      text,
    type             room_type   NOT NULL,
    created_by       uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    is_active        boolean     NOT NULL DEFAULT true,
    -- The room's message counter: the next message takes last_seq + 1 in the transaction
    -- that inserts it, so seq order within a room is commit order (see docs/design.md).
    last_seq         bigint      NOT NULL DEFAULT 0,
    -- For direct rooms only: the pair, smaller id first.
    direct_user_low  uuid        REFERENCES users (id) ON DELETE CASCADE,
    direct_user_high uuid        REFERENCES users (id) ON DELETE CASCADE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rooms_name_check
        CHECK (char_length(name) BETWEEN 1 AND 100 AND btrim(name) <> ''),
    CONSTRAINT rooms_description_check
        CHECK (description IS NULL OR char_length(description) <= 1000),
    CONSTRAINT rooms_last_seq_check CHECK (last_seq >= 0),
    CONSTRAINT rooms_direct_pair_check CHECK (
        (type = 'direct') = (direct_user_low IS NOT NULL AND direct_user_high IS NOT NULL)
        AND (direct_user_low IS NULL) = (direct_user_high IS NULL)
        AND (direct_user_low IS NULL OR direct_user_low <= direct_user_high)
    ),
    CONSTRAINT rooms_direct_pair_key UNIQUE (direct_user_low, direct_user_high)
);

COMMENT ON COLUMN rooms.last_seq IS 'seq of the newest message; allocates the next one';

-- chatkeep:down
DROP TABLE rooms;
DROP TYPE room_type;
