-- Triggers: updated_at stays current on users and rooms; a message inserted without a seq
-- (by hand, or by any path that forgets) takes the next one from its room, under the room
-- row lock, so seq stays gapless and in commit order whoever inserts.

-- chatkeep:up
CREATE FUNCTION chatkeep_set_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER users_set_updated_at
    BEFORE UPDATE ON users
    FOR EACH ROW
    WHEN (OLD.* IS DISTINCT FROM NEW.*)
    EXECUTE FUNCTION chatkeep_set_updated_at();

-- last_seq changes on every message; that is not an update of the room itself.
CREATE TRIGGER rooms_set_updated_at
    BEFORE UPDATE ON rooms
    FOR EACH ROW
    WHEN ((OLD.name, OLD.description, OLD.type, OLD.is_active, OLD.created_by)
          IS DISTINCT FROM
          (NEW.name, NEW.description, NEW.type, NEW.is_active, NEW.created_by))
    EXECUTE FUNCTION chatkeep_set_updated_at();

CREATE FUNCTION chatkeep_assign_message_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq IS NULL THEN
        UPDATE rooms SET last_seq = last_seq + 1
         WHERE id = NEW.room_id
        RETURNING last_seq INTO NEW.seq;
        IF NEW.seq IS NULL THEN
            -- Report it as the foreign key would, rather than as a NULL seq.
            RAISE EXCEPTION 'room % does not exist', NEW.room_id
                USING ERRCODE = 'foreign_key_violation',
                      CONSTRAINT = 'messages_room_id_fkey',
                      TABLE = 'messages';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER messages_assign_seq
    BEFORE INSERT ON messages
    FOR EACH ROW
    WHEN (NEW.seq IS NULL)
    EXECUTE FUNCTION chatkeep_assign_message_seq();

-- chatkeep:down
DROP TRIGGER messages_assign_seq ON messages;
DROP FUNCTION chatkeep_assign_message_seq();
DROP TRIGGER rooms_set_updated_at ON rooms;
DROP TRIGGER users_set_updated_at ON users;
DROP FUNCTION chatkeep_set_updated_at();
