-- A new key, as the PostgreSQL store runs it: the claim, then the completion (two
-- autocommit statements, two round trips), copied from crates/oncely-postgres/src/sql.rs
-- (Sql::claim, Sql::complete) with the gateway's defaults: 30 s lease, 24 h retention,
-- a 200-byte payload. One pgbench "transaction" = one new key.
\set r random(1, 9223372036854775806)
INSERT INTO oncely_records AS r (storage_key, key, scope, fingerprint, created_at, expires_at, claim_id,
    lease_until, lease_us, hits, attempt, waited)
VALUES (sha256(convert_to((:client_id)::text || '-' || (:r)::text, 'UTF8')), 'pgbench-' || (:r)::text, 'bench', NULL, now(),
    now() + 86400000000::float8 * interval '1 microsecond', md5((:client_id)::text || '-' || (:r)::text)::uuid,
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
    set_config('synchronous_commit', CASE WHEN claim_id = md5((:client_id)::text || '-' || (:r)::text)::uuid THEN current_setting('synchronous_commit') ELSE 'off' END, true);
WITH mine AS (
    SELECT storage_key FROM oncely_records
    WHERE storage_key = sha256(convert_to((:client_id)::text || '-' || (:r)::text, 'UTF8'))
      AND claim_id = md5((:client_id)::text || '-' || (:r)::text)::uuid AND expires_at > now()
    FOR UPDATE SKIP LOCKED),
done AS (
    UPDATE oncely_records SET claim_id = NULL, lease_until = NULL, payload = convert_to(repeat('x', 200), 'UTF8'),
        completed_at = now(), expires_at = now() + 86400000000::float8 * interval '1 microsecond', hits = 0
    WHERE storage_key IN (SELECT storage_key FROM mine)
    RETURNING storage_key, waited),
woken AS (SELECT pg_notify('oncely_records', encode(storage_key, 'hex')) FROM done WHERE waited)
SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM woken),
    EXISTS (SELECT 1 FROM oncely_records
            WHERE storage_key = sha256(convert_to((:client_id)::text || '-' || (:r)::text, 'UTF8'))
              AND claim_id = md5((:client_id)::text || '-' || (:r)::text)::uuid AND expires_at > now());
