-- W3C tracestate beside traceparent: the trace context of the change, carried to the
-- relay's span and every handler. Nullable; a relay reading a table without it (a host
-- of another language on the older contract) reads no trace state.
ALTER TABLE hookbus_outbox ADD COLUMN tracestate TEXT NULL;
