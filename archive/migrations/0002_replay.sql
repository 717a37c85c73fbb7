-- What the replay tool needs: indexes for its id filters, a JSON reader for body filters
-- that never fails, and the history of replays with their confirmed cursors.
CREATE INDEX messages_message_id_idx ON rabbit_archive.messages (message_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX messages_correlation_id_idx ON rabbit_archive.messages (correlation_id)
    WHERE correlation_id IS NOT NULL;

-- The body as jsonb, or NULL when it is not a JSON object or array in UTF-8, so that a
-- --body-json filter skips binary and malformed bodies instead of failing the query.
CREATE FUNCTION rabbit_archive.body_json(body bytea)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    first_byte integer;
BEGIN
    -- Only bodies that start like a JSON object or array (after whitespace) are parsed.
    first_byte := get_byte(ltrim(body, '\x20090a0d'::bytea), 0);
    IF first_byte NOT IN (123, 91) THEN
        RETURN NULL;
    END IF;
    RETURN convert_from(body, 'UTF8')::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END;
$$;

-- One row per replay; `confirmed_cursor` is the last archive id (or file line) whose publish the
-- broker confirmed, with every earlier one confirmed too: resume continues after it.
CREATE TABLE rabbit_archive.replays (
    id text PRIMARY KEY,
    status text NOT NULL CHECK (status IN ('running', 'completed', 'interrupted', 'failed')),
    filters jsonb NOT NULL,
    target jsonb NOT NULL,
    options jsonb NOT NULL,
    operator text NOT NULL,
    reason text,
    upto_id bigint,
    selected bigint NOT NULL,
    published bigint NOT NULL DEFAULT 0,
    confirmed bigint NOT NULL DEFAULT 0,
    returned bigint NOT NULL DEFAULT 0,
    nacked bigint NOT NULL DEFAULT 0,
    confirmed_cursor bigint NOT NULL DEFAULT 0,
    error text,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX replays_started_at_idx ON rabbit_archive.replays (started_at);
