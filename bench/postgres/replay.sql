-- A replay, as the PostgreSQL store runs it: one claim of a completed key (the one
-- statement of Sql::claim), which counts the hit. The key is `:replay_key` (set with -D).
INSERT INTO oncely_records AS r (storage_key, key, scope, fingerprint, created_at, expires_at, claim_id,
    lease_until, lease_us, hits, attempt, waited)
VALUES (sha256(convert_to((:replay_key)::text, 'UTF8')), 'pgbench-replay', 'bench', NULL, now(),
    now() + 86400000000::float8 * interval '1 microsecond', gen_random_uuid(),
    now() + 30000000::float8 * interval '1 microsecond', 30000000::float8::bigint, 0, 1, false)
ON CONFLICT (storage_key) DO UPDATE SET
    key            = CASE WHEN r.expires_at <= now() THEN excluded.key ELSE r.key END,
    scope          = CASE WHEN r.expires_at <= now() THEN excluded.scope ELSE r.scope END,
    fingerprint    = CASE WHEN r.expires_at <= now() THEN excluded.fingerprint ELSE r.fingerprint END,
    created_at     = CASE WHEN r.expires_at <= now() THEN excluded.created_at ELSE r.created_at END,
    claim_id       = CASE WHEN r.expires_at <= now() OR (r.claim_id IS NOT NULL AND r.lease_until <= now() AND r.fingerprint IS NOT DISTINCT FROM excluded.fingerprint) THEN excluded.claim_id ELSE r.claim_id END,
    lease_until    = CASE WHEN r.expires_at <= now() OR (r.claim_id IS NOT NULL AND r.lease_until <= now() AND r.fingerprint IS NOT DISTINCT FROM excluded.fingerprint) THEN excluded.lease_until ELSE r.lease_until END,
    lease_us       = CASE WHEN r.expires_at <= now() OR (r.claim_id IS NOT NULL AND r.lease_until <= now() AND r.fingerprint IS NOT DISTINCT FROM excluded.fingerprint) THEN excluded.lease_us ELSE r.lease_us END,
    expires_at     = CASE WHEN r.expires_at <= now() OR (r.claim_id IS NOT NULL AND r.lease_until <= now() AND r.fingerprint IS NOT DISTINCT FROM excluded.fingerprint) THEN excluded.expires_at ELSE r.expires_at END,
    payload        = CASE WHEN r.expires_at <= now() THEN NULL ELSE r.payload END,
    completed_at   = CASE WHEN r.expires_at <= now() THEN NULL ELSE r.completed_at END,
    hits           = CASE WHEN r.expires_at <= now() THEN 0 WHEN (r.claim_id IS NULL AND r.fingerprint IS NOT DISTINCT FROM excluded.fingerprint) THEN r.hits + 1 ELSE r.hits END,
    attempt        = CASE WHEN r.expires_at <= now() THEN 1 WHEN (r.claim_id IS NOT NULL AND r.lease_until <= now() AND r.fingerprint IS NOT DISTINCT FROM excluded.fingerprint) THEN r.attempt + 1 ELSE r.attempt END,
    recovery_point = CASE WHEN r.expires_at <= now() THEN NULL ELSE r.recovery_point END,
    waited         = CASE WHEN r.expires_at <= now() THEN false ELSE r.waited END
RETURNING storage_key, key, scope, fingerprint, (extract(epoch FROM created_at) * 1000000)::int8,
    (extract(epoch FROM expires_at) * 1000000)::int8, claim_id, (extract(epoch FROM lease_until) * 1000000)::int8,
    payload, (extract(epoch FROM completed_at) * 1000000)::int8, hits, attempt,
    set_config('synchronous_commit', CASE WHEN claim_id = md5('never')::uuid THEN current_setting('synchronous_commit') ELSE 'off' END, true);
