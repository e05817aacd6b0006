"""The PostgreSQL ledger's SQL: the record upsert and the per-job totals (split from
:mod:`sidecar.ledger.postgres`, which runs them)."""

from __future__ import annotations

from typing import Final

from sidecar.ledger.rows import CLAIM_COLUMNS, RECORD_COLUMNS

SELECT_RECORD: Final = RECORD_COLUMNS.replace("job_id", "job_id::text AS job_text")
SELECT_CLAIM: Final = CLAIM_COLUMNS.replace("job_id", "job_id::text AS job_text")
VALUES: Final = ", ".join(
    "%s::numeric" if column.strip() == "job_id" else "%s" for column in RECORD_COLUMNS.split(",")
)

# Only an open row may change (a replayed final record is a no-op); started_ms and replica keep
# their first values.
UPSERT: Final = f"""
INSERT INTO usage_records ({RECORD_COLUMNS}, replica) VALUES ({VALUES}, %s)
ON CONFLICT (key) DO UPDATE SET
    job_id = EXCLUDED.job_id,
    endpoint = EXCLUDED.endpoint,
    model = EXCLUDED.model,
    prompt_tokens = EXCLUDED.prompt_tokens,
    completion_tokens = EXCLUDED.completion_tokens,
    billable_tokens = EXCLUDED.billable_tokens,
    source = EXCLUDED.source,
    state = EXCLUDED.state,
    status = EXCLUDED.status,
    updated_ms = EXCLUDED.updated_ms,
    cached_tokens = EXCLUDED.cached_tokens,
    reasoning_tokens = EXCLUDED.reasoning_tokens
WHERE usage_records.state = 'open'
"""

TOTALS: Final = """
SELECT job_id::text AS job_text, SUM(n), SUM(open_n), SUM(prompt), SUM(completion), SUM(billable),
       json_object_agg(source, billable)::text, MIN(first_ms), MAX(last_ms), SUM(cached),
       SUM(reasoning)
FROM (
    SELECT job_id, source,
           COUNT(*) AS n,
           COUNT(*) FILTER (WHERE state = 'open') AS open_n,
           COALESCE(SUM(prompt_tokens), 0) AS prompt,
           SUM(completion_tokens) AS completion,
           SUM(billable_tokens) AS billable,
           MIN(started_ms) AS first_ms,
           MAX(updated_ms) AS last_ms,
           COALESCE(SUM(cached_tokens), 0) AS cached,
           COALESCE(SUM(reasoning_tokens), 0) AS reasoning
    FROM usage_records
    {where}
    GROUP BY job_id, source
) AS per_source
GROUP BY job_id
ORDER BY job_id NULLS LAST
"""
CLAIM_ORDER: Final = "ORDER BY job_id, seq"
