-- Full-text search over messages (docs/design.md, "Search").
--
-- The index is an expression GIN index on to_tsvector('simple', content), not a stored
-- generated column: adding a STORED column rewrites the whole table under an ACCESS
-- EXCLUSIVE lock, and doubles the bytes each send writes; the expression index is built
-- CONCURRENTLY (no lock that stops sends) and the database keeps it true on every insert,
-- edit and delete, whatever path made the change. 'simple' lower-cases and splits on
-- spaces and punctuation, with no stemming and no stop words: it treats every language
-- alike (docs/design.md says what CJK text gets, and how to switch configuration).
--
-- Why a server function: `@@` is not LEAKPROOF, so under row security PostgreSQL will not
-- use it as an index condition before the policy's own test has run (a non-leakproof
-- function could leak rows the policy hides). The application role's search therefore
-- scanned every message of the user's rooms (1.2 s for a user with 50,000). This
-- function, SECURITY DEFINER and owned by chatapp_owner (whose policy passes every row),
-- runs the text match through the index, restricted to the acting user's rooms by the
-- same chatkeep_acting_rooms() the policies call, and returns only ids and sort keys;
-- the caller then reads the messages themselves through messages' row security, which
-- stays the judge of what the user sees (this pre-filter can only narrow it). With no
-- acting user it returns nothing.
--
-- No transaction: CREATE INDEX CONCURRENTLY refuses to run in one. Each statement is
-- idempotent, so a run that failed part-way is rerun as is (an INVALID index left by a
-- failed build must be dropped first: docs/troubleshooting.md).

-- chatkeep:no-transaction
-- chatkeep:up
CREATE INDEX CONCURRENTLY IF NOT EXISTS messages_content_search_idx
    ON messages USING gin (to_tsvector('simple'::regconfig, content));

CREATE OR REPLACE FUNCTION chatkeep_search_messages(
    cfg regconfig, query text, room uuid, author uuid, since timestamptz,
    until timestamptz, ranked boolean, after_at timestamptz, after_rank real,
    after_id uuid, max_rows integer
) RETURNS TABLE (id uuid, created_at timestamptz, rank real)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q tsquery := websearch_to_tsquery(cfg, query);
    rooms uuid[] := public.chatkeep_acting_rooms('member');
    -- The configuration goes into the text as a literal, so the expression matches the
    -- index's (a parameter would not, under a generic plan).
    doc text := format('to_tsvector(%L::regconfig, m.content)', cfg::text);
    stmt text;
BEGIN
    IF numnode(q) = 0 OR cardinality(rooms) = 0 OR max_rows < 1 THEN
        RETURN;
    END IF;
    stmt := 'SELECT m.id, m.created_at, '
        || CASE WHEN ranked THEN 'ts_rank(' || doc || ', $1)' ELSE 'NULL::real' END
        || ' AS rank FROM public.messages m WHERE ' || doc || ' @@ $1'
        || ' AND m.room_id = ANY ($2)'
        || CASE WHEN room IS NULL THEN '' ELSE ' AND m.room_id = $3' END
        || CASE WHEN author IS NULL THEN '' ELSE ' AND m.user_id = $4' END
        || CASE WHEN since IS NULL THEN '' ELSE ' AND m.created_at >= $5' END
        || CASE WHEN until IS NULL THEN '' ELSE ' AND m.created_at < $6' END;
    IF ranked THEN
        stmt := 'SELECT s.id, s.created_at, s.rank FROM (' || stmt || ') s'
            || CASE WHEN after_id IS NULL THEN ''
                    ELSE ' WHERE (s.rank, s.created_at, s.id) < ($8, $7, $9)' END
            || ' ORDER BY s.rank DESC, s.created_at DESC, s.id DESC LIMIT $10';
    ELSE
        stmt := stmt
            || CASE WHEN after_id IS NULL THEN ''
                    ELSE ' AND (m.created_at, m.id) < ($7, $9)' END
            || ' ORDER BY m.created_at DESC, m.id DESC LIMIT $10';
    END IF;
    RETURN QUERY EXECUTE stmt
        USING q, rooms, room, author, since, until, after_at, after_rank, after_id, max_rows;
END
$$;

REVOKE EXECUTE ON FUNCTION chatkeep_search_messages(
    regconfig, text, uuid, uuid, timestamptz, timestamptz, boolean, timestamptz, real, uuid,
    integer
) FROM PUBLIC;

GRANT EXECUTE ON FUNCTION chatkeep_search_messages(
    regconfig, text, uuid, uuid, timestamptz, timestamptz, boolean, timestamptz, real, uuid,
    integer
) TO chatapp_app, chatapp_owner;

-- chatkeep:down
DROP FUNCTION IF EXISTS chatkeep_search_messages(
    regconfig, text, uuid, uuid, timestamptz, timestamptz, boolean, timestamptz, real, uuid,
    integer
);
DROP INDEX CONCURRENTLY IF EXISTS messages_content_search_idx;
