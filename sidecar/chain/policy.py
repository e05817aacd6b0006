"""When, and how many tokens, to claim on-chain for one job: a pure policy.

``decide(JobState) -> Decision``, and the contract's claim rules it obeys: the minimum claim
(:data:`MIN_CLAIM_TOKENS`, the one definition config.py and the marketplace adapters use) and the
rate cap (:func:`rate_cap`). No clock, no chain, no ledger: the caller passes the job's
state (from the ledger and the cached on-chain view) and acts on the answer. The rules, each a
mistake a public host made:

- A claim is a *delta* of billable tokens, never the running total (the contract adds it to
  ``tokensUsed``; one node sent 100, 200, 300... and overcharged its users).
- Never a token that was not metered, and never padding up to a checkpoint (a host that padded
  every checkpoint tripped the rate cap).
- At least the contract's minimum (100) per claim; claim once ``checkpoint`` tokens are unclaimed.
- Never more than the rate cap allows since the last proof, ``(now - lastProofTime) * rate``:
  wait until it does instead.
- Never beyond the deposit.
- One claim in flight per job: the next claim's cap starts when the pending one is mined, and
  settlement waits for the last proof to be mined (one node settled before its final proof was
  mined, refunding the user in full).
- Fewer, larger claims cost less gas per token (the v1 contract scans every earlier proof):
  claim as much as the cap and the deposit allow, and at settlement wait for the cap to allow the
  whole remainder in one claim unless the session's timeout would come first.
- A partial claim (the cap allows less than is unclaimed) never leaves a remainder under the
  contract's minimum: it leaves at least the minimum for the next claim, or waits for the cap to
  allow all of it (unless the session's timeout is near).
- At settlement, a remainder the contract cannot take (under its minimum, or beyond the deposit)
  is reported as unclaimable, so the ledger can record it and the books balance.

``now`` is chain time (the latest block's timestamp), not the wall clock: the contract measures
the cap with ``block.timestamp``, which only grows between the decision and the mining.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

# Nothing heavy is imported here: config.py imports this module.
MIN_CLAIM_TOKENS = 100  # MIN_PROVEN_TOKENS in both contract versions
DEFAULT_CHECKPOINT_TOKENS = 100


class IdleReason(StrEnum):
    NOTHING_UNCLAIMED = "nothing_unclaimed"  # every metered token is claimed
    BELOW_CHECKPOINT = "below_checkpoint"  # fewer than the checkpoint size unclaimed
    IN_FLIGHT = "in_flight"  # a claim of this job is not mined yet
    BUDGET_EXHAUSTED = "budget_exhausted"  # the deposit covers no further claim


@dataclass(frozen=True, slots=True)
class JobState:
    """One job's state, as the caller knows it.

    ``claimed`` counts the job's proof claims that are pending, sent or confirmed (not failed, not
    an unclaimable remainder). ``onchain_used`` and ``budget`` come from the same read of
    ``sessionJobs``: ``budget`` is the tokens the deposit still covers beyond ``onchain_used``.
    ``min_first_claim`` is v2's rule that the first proof covers at least ``proofInterval``
    tokens (0 on v1). A view read before the last claim was mined looks like a claim in flight
    (``claimed > onchain_used``): refresh it after every claim. ``claim_by`` (optional) is when
    the caller wants unclaimed tokens secured even below the checkpoint size, e.g. a margin
    before the session's timeout.
    """

    metered: int
    claimed: int
    onchain_used: int
    budget: int
    last_proof_time: int
    now: int
    rate: int
    checkpoint: int = DEFAULT_CHECKPOINT_TOKENS
    settling: bool = False
    min_first_claim: int = 0
    claim_by: int | None = None

    def __post_init__(self) -> None:
        for name in ("metered", "claimed", "onchain_used", "budget", "min_first_claim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.rate, int) or self.rate <= 0:
            raise ValueError(f"rate must be a positive integer, got {self.rate!r}")
        if not isinstance(self.checkpoint, int) or self.checkpoint < MIN_CLAIM_TOKENS:
            raise ValueError(
                f"checkpoint must be at least the contract minimum of {MIN_CLAIM_TOKENS} tokens"
            )


@dataclass(frozen=True, slots=True)
class ClaimNow:
    """Claim ``tokens`` (a delta) now."""

    tokens: int


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """The rate cap allows the next claim (of ``tokens``) at chain time ``at``; ask again then."""

    at: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing to send now; ask again when something changes (new tokens, a claim mined)."""

    reason: IdleReason


@dataclass(frozen=True, slots=True)
class Settle:
    """Every claimable token is claimed and mined: settle the session.

    ``unclaimable`` tokens were metered but can never be claimed; ``over_budget`` of them lie
    beyond the deposit, the rest are a remainder under the contract's minimum claim.
    """

    unclaimable: int
    over_budget: int


Decision = ClaimNow | WaitUntil | Idle | Settle


def rate_cap(last_proof_time: int, now: int, rate: int) -> int:
    """The most tokens a claim mined at ``now`` may carry, ``rate`` being the contract's tokens
    per second (``Marketplace.default_rate``)."""
    return max(0, now - last_proof_time) * rate


def time_for(last_proof_time: int, tokens: int, rate: int) -> int:
    """The earliest chain time at which the cap allows ``tokens``."""
    return last_proof_time + -(-tokens // rate)  # ceiling division, in integers


def decide(state: JobState) -> Decision:
    if state.claimed > state.onchain_used:
        return Idle(IdleReason.IN_FLIGHT)
    # Nothing in flight, so the chain's count is the claimed total. It wins over the ledger's
    # when larger (a lost outbox row, another replica): never claim those tokens twice.
    claimed = state.onchain_used
    unclaimed = max(0, state.metered - claimed)
    headroom = state.budget  # read with onchain_used, so it is the deposit's room beyond it
    minimum = MIN_CLAIM_TOKENS
    if claimed == 0:
        minimum = max(minimum, state.min_first_claim)
    desired = min(unclaimed, headroom)

    if desired < minimum:
        if state.settling:
            return Settle(unclaimable=unclaimed, over_budget=unclaimed - desired)
        if unclaimed == 0:
            return Idle(IdleReason.NOTHING_UNCLAIMED)
        if headroom < minimum:
            return Idle(IdleReason.BUDGET_EXHAUSTED)
        return Idle(IdleReason.BELOW_CHECKPOINT)

    urgent = state.claim_by is not None and state.now >= state.claim_by
    # The smallest claim worth sending now: a checkpoint, or the rest of the deposit when less
    # remains. When settling or urgent, any claim the contract accepts.
    if state.settling or urgent:
        smallest = minimum
    else:
        smallest = min(desired, max(state.checkpoint, minimum))
        if unclaimed < state.checkpoint and desired < headroom:
            return Idle(IdleReason.BELOW_CHECKPOINT)

    cap = rate_cap(state.last_proof_time, state.now, state.rate)
    if cap >= desired:
        return ClaimNow(desired)

    if state.settling and not urgent:
        # No new tokens will come: one claim of the whole remainder costs least gas and lands no
        # later than several, unless the caller's claim-by time comes first.
        full_at = time_for(state.last_proof_time, desired, state.rate)
        if state.claim_by is None or full_at <= state.claim_by:
            return WaitUntil(full_at, desired)
        if cap >= smallest:
            return ClaimNow(cap)
        return WaitUntil(time_for(state.last_proof_time, smallest, state.rate), smallest)

    if cap >= smallest:
        return _partial(state, cap, desired, smallest, urgent)
    return WaitUntil(time_for(state.last_proof_time, smallest, state.rate), smallest)


def _partial(state: JobState, cap: int, desired: int, smallest: int, urgent: bool) -> Decision:
    """Claim what the cap allows now, but never strand a remainder the contract cannot take.

    Claiming ``cap`` of ``desired`` would leave ``desired - cap``; if that is under the
    contract's minimum and no more tokens come, it can never be claimed. So leave at least the
    minimum for the next claim, or wait until the cap allows all of it (when urgent, take what
    the cap allows).
    """
    if urgent or desired - cap >= MIN_CLAIM_TOKENS:
        return ClaimNow(cap)
    keep_claimable = desired - MIN_CLAIM_TOKENS
    if keep_claimable >= smallest:
        return ClaimNow(keep_claimable)
    return WaitUntil(time_for(state.last_proof_time, desired, state.rate), desired)
