"""The people-facing table of the ledger's per-job totals (``sidecar jobs``, the demo)."""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.ledger import Claim, ClaimKind, ClaimState, JobTotals, claim_totals


def format_jobs_table(
    totals: Sequence[JobTotals], claims: dict[int, list[Claim]] | None = None
) -> str:
    """A fixed-width table of job totals (and, with a chain, what was claimed), for people."""
    with_chain = bool(claims)
    header: tuple[str, ...] = ("job", "requests", "open", "prompt", "completion", "billable")
    if with_chain:
        header += ("claimed", "confirmed", "unclaimable", "settled")
    header += ("by source",)
    rows = [header]
    for t in totals:
        sources = ", ".join(f"{k} {v}" for k, v in sorted(t.billable_by_source.items())) or "-"
        row: tuple[str, ...] = (
            "unattributed" if t.job_id is None else str(t.job_id),
            str(t.requests),
            str(t.open_requests),
            str(t.prompt_tokens),
            str(t.completion_tokens),
            str(t.billable_tokens),
        )
        if with_chain:
            mine = (claims or {}).get(t.job_id, []) if t.job_id is not None else []
            sums = claim_totals(mine)
            settled = any(
                c.kind is ClaimKind.SETTLE and c.state is ClaimState.CONFIRMED for c in mine
            )
            row += (
                str(sums["tokens_claimed"]),
                str(sums["tokens_confirmed"]),
                str(sums["tokens_unclaimable"]),
                "yes" if settled else "-" if t.job_id is None else "no",
            )
        rows.append((*row, sources))
    if len(rows) == 1:
        return "no usage recorded yet"
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
