"""The checkpoint policy: when and how much to claim, against the contract's rules."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.chain.policy import (
    MIN_CLAIM_TOKENS,
    ClaimNow,
    Idle,
    IdleReason,
    JobState,
    Settle,
    WaitUntil,
    decide,
    rate_cap,
    time_for,
)

NOW = 1_000_000


def state(**changes: object) -> JobState:
    """A fresh job with a large deposit, its last proof long ago (the cap is no constraint)."""
    base = JobState(
        metered=0,
        claimed=0,
        onchain_used=0,
        budget=100_000,
        last_proof_time=NOW - 3600,
        now=NOW,
        rate=20,
    )
    return dataclasses.replace(base, **changes)


# -- when to claim ------------------------------------------------------------------------------


def test_nothing_metered() -> None:
    assert decide(state()) == Idle(IdleReason.NOTHING_UNCLAIMED)


def test_below_the_checkpoint() -> None:
    assert decide(state(metered=99)) == Idle(IdleReason.BELOW_CHECKPOINT)
    assert decide(state(metered=299, checkpoint=300)) == Idle(IdleReason.BELOW_CHECKPOINT)


def test_claims_at_the_checkpoint() -> None:
    assert decide(state(metered=100)) == ClaimNow(100)
    assert decide(state(metered=300, checkpoint=300)) == ClaimNow(300)


def test_claims_everything_the_cap_and_deposit_allow() -> None:
    # Fewer, larger claims: 1234 unclaimed with a checkpoint of 100 is one claim of 1234.
    assert decide(state(metered=1234)) == ClaimNow(1234)


def test_claims_are_deltas_not_running_totals() -> None:
    # A public node sent 100, 200, 300...: after 200 claimed, 300 metered is a claim of 100.
    assert decide(state(metered=300, claimed=200, onchain_used=200)) == ClaimNow(100)
    assert decide(state(metered=300, claimed=300, onchain_used=300)) == Idle(
        IdleReason.NOTHING_UNCLAIMED
    )


def test_never_pads_up_to_a_checkpoint() -> None:
    decision = decide(state(metered=150, checkpoint=200))
    assert decision == Idle(IdleReason.BELOW_CHECKPOINT)


def test_checkpoint_below_the_contract_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="at least the contract minimum of 100"):
        state(checkpoint=99)


@pytest.mark.parametrize(
    "change",
    [
        {"rate": 0},
        {"rate": -1},
        {"metered": -1},
        {"claimed": -5},
        {"budget": -1},
        {"onchain_used": -1},
        {"min_first_claim": -1},
        {"metered": 1.5},
    ],
)
def test_refuses_nonsense(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        state(**change)


# -- the rate cap -------------------------------------------------------------------------------


def test_claims_what_the_cap_allows_when_it_allows_a_checkpoint() -> None:
    # v1: 20 tokens/s; 10 s since the last proof allow 200 of the 500 unclaimed.
    assert decide(state(metered=500, last_proof_time=NOW - 10)) == ClaimNow(200)


def test_waits_when_the_cap_allows_less_than_a_checkpoint() -> None:
    decision = decide(state(metered=500, last_proof_time=NOW - 2))
    assert decision == WaitUntil(at=NOW - 2 + 5, tokens=100)
    decision = decide(state(metered=500, checkpoint=250, last_proof_time=NOW - 2))
    assert decision == WaitUntil(at=NOW - 2 + 13, tokens=250)  # 12.5 s rounds up


def test_cap_at_the_very_second_of_the_last_proof_is_zero() -> None:
    assert decide(state(metered=500, last_proof_time=NOW)) == WaitUntil(NOW + 5, 100)


def test_chain_time_behind_the_last_proof_never_claims() -> None:
    assert decide(state(metered=500, last_proof_time=NOW + 7)) == WaitUntil(NOW + 12, 100)


def test_v2_rate() -> None:
    assert decide(state(metered=5000, rate=2000, last_proof_time=NOW - 1)) == ClaimNow(2000)


@given(lpt=st.integers(0, 10**6), tokens=st.integers(1, 10**6), rate=st.integers(1, 5000))
def test_time_for_is_the_first_second_the_cap_allows(lpt: int, tokens: int, rate: int) -> None:
    at = time_for(lpt, tokens, rate)
    assert rate_cap(lpt, at, rate) >= tokens
    assert rate_cap(lpt, at - 1, rate) < tokens


# -- the deposit --------------------------------------------------------------------------------


def test_never_beyond_the_deposit() -> None:
    assert decide(state(metered=1000, budget=250)) == ClaimNow(250)
    after = state(metered=1000, claimed=250, onchain_used=250, budget=0)
    assert decide(after) == Idle(IdleReason.BUDGET_EXHAUSTED)


def test_the_last_of_the_deposit_may_be_less_than_a_checkpoint() -> None:
    assert decide(state(metered=200, checkpoint=500, budget=150)) == ClaimNow(150)
    # ...but not less than the contract's minimum.
    assert decide(state(metered=200, checkpoint=500, budget=99)) == Idle(
        IdleReason.BUDGET_EXHAUSTED
    )


def test_budget_is_counted_from_the_chain_and_the_claims_in_flight() -> None:
    # 200 proven on-chain, 300 more covered: 300 headroom.
    assert decide(state(metered=900, claimed=200, onchain_used=200, budget=300)) == ClaimNow(300)


# -- one claim in flight ------------------------------------------------------------------------


def test_waits_for_a_claim_in_flight() -> None:
    pending = state(metered=900, claimed=300, onchain_used=200)
    assert decide(pending) == Idle(IdleReason.IN_FLIGHT)
    assert decide(dataclasses.replace(pending, settling=True)) == Idle(IdleReason.IN_FLIGHT)


def test_tokens_the_chain_counted_are_never_claimed_again() -> None:
    # The ledger lost a confirmed claim (or another replica made it): the chain's count wins.
    decision = decide(state(metered=350, claimed=100, onchain_used=300, budget=99_700))
    assert decision == Idle(IdleReason.BELOW_CHECKPOINT)
    decision = decide(state(metered=450, claimed=100, onchain_used=300, budget=99_700))
    assert decision == ClaimNow(150)


# -- v2's first proof ---------------------------------------------------------------------------


def test_v2_first_claim_covers_the_proof_interval() -> None:
    assert decide(state(metered=500, min_first_claim=1000)) == Idle(IdleReason.BELOW_CHECKPOINT)
    assert decide(state(metered=1000, min_first_claim=1000, rate=2000)) == ClaimNow(1000)
    # Only the first: afterwards the contract's minimum of 100 applies again.
    later = state(metered=1100, claimed=1000, onchain_used=1000, min_first_claim=1000)
    assert decide(later) == ClaimNow(100)


def test_v2_first_claim_waits_for_the_cap_to_allow_the_interval() -> None:
    decision = decide(state(metered=1500, min_first_claim=1000, last_proof_time=NOW - 10))
    assert decision == WaitUntil(NOW - 10 + 50, 1000)  # 20 tokens/s


# -- urgency: secure tokens before the session can time out -------------------------------------


def test_claim_by_lowers_the_threshold_to_the_contract_minimum() -> None:
    assert decide(state(metered=150, checkpoint=500, claim_by=NOW)) == ClaimNow(150)
    assert decide(state(metered=150, checkpoint=500, claim_by=NOW + 1)) == Idle(
        IdleReason.BELOW_CHECKPOINT
    )
    assert decide(state(metered=99, checkpoint=500, claim_by=NOW)) == Idle(
        IdleReason.BELOW_CHECKPOINT
    )


# -- settlement ---------------------------------------------------------------------------------


def test_settles_with_nothing_left() -> None:
    done = state(metered=500, claimed=500, onchain_used=500, settling=True)
    assert decide(done) == Settle(unclaimable=0, over_budget=0)
    assert decide(state(settling=True)) == Settle(0, 0)


def test_a_remainder_of_at_least_100_is_claimed_first() -> None:
    assert decide(state(metered=600, claimed=500, onchain_used=500, settling=True)) == ClaimNow(100)


def test_a_remainder_under_100_is_unclaimable() -> None:
    decision = decide(state(metered=599, claimed=500, onchain_used=500, settling=True))
    assert decision == Settle(unclaimable=99, over_budget=0)


def test_settlement_ignores_the_checkpoint_size() -> None:
    decision = decide(state(metered=250, checkpoint=1000, settling=True))
    assert decision == ClaimNow(250)


def test_settlement_waits_for_one_claim_of_the_whole_remainder() -> None:
    # 1000 tokens at 20 tokens/s: one claim at +50 s costs less gas than five, lands no later.
    decision = decide(state(metered=1000, last_proof_time=NOW - 10, settling=True))
    assert decision == WaitUntil(NOW - 10 + 50, 1000)


def test_settlement_claims_in_parts_when_the_session_would_time_out_first() -> None:
    settling = state(metered=1000, last_proof_time=NOW - 10, settling=True, claim_by=NOW + 20)
    assert decide(settling) == ClaimNow(200)
    just_proved = dataclasses.replace(settling, last_proof_time=NOW - 2)
    assert decide(just_proved) == WaitUntil(NOW - 2 + 5, 100)
    past = dataclasses.replace(settling, claim_by=NOW - 1)
    assert decide(past) == ClaimNow(200)


def test_settlement_over_the_deposit() -> None:
    over = state(metered=1000, budget=300, settling=True)
    assert decide(over) == ClaimNow(300)
    spent = state(metered=1000, claimed=300, onchain_used=300, budget=0, settling=True)
    assert decide(spent) == Settle(unclaimable=700, over_budget=700)
    # 50 still covered, but under the minimum: all 1000 unclaimable, 950 of them over the deposit.
    assert decide(state(metered=1000, budget=50, settling=True)) == Settle(1000, 950)


def test_settlement_waits_for_the_last_proof_to_be_mined() -> None:
    # The user got a 100% refund when a host settled before its final proof was mined.
    pending = state(metered=600, claimed=600, onchain_used=500, settling=True)
    assert decide(pending) == Idle(IdleReason.IN_FLIGHT)


def test_v2_settlement_below_the_first_claim_minimum() -> None:
    decision = decide(state(metered=500, min_first_claim=1000, settling=True))
    assert decision == Settle(unclaimable=500, over_budget=0)


# -- properties, over whole simulated sessions --------------------------------------------------


@dataclasses.dataclass
class Chain:
    """The contract's rules for one session, checking every claim as the contract would."""

    max_tokens: int
    rate: int
    min_first: int
    last_proof_time: int
    tokens_used: int = 0
    claims: int = 0

    def accept(self, tokens: int, at: int, metered: int) -> None:
        assert tokens >= MIN_CLAIM_TOKENS, "Must claim minimum tokens"
        if self.tokens_used == 0:
            assert tokens >= self.min_first, "Low first"
        assert tokens <= rate_cap(self.last_proof_time, at, self.rate), "Excessive tokens claimed"
        assert self.tokens_used + tokens <= self.max_tokens, "Exceeds deposit"
        assert self.tokens_used + tokens <= metered, "a token that was not metered"
        self.tokens_used += tokens
        self.last_proof_time = at
        self.claims += 1


session_steps = st.lists(
    st.tuples(
        st.integers(0, 30),  # seconds until the next step
        st.integers(0, 400),  # tokens metered meanwhile
        st.booleans(),  # the claim sent at this step is mined only at the next one
        st.booleans(),  # jump to the time a WaitUntil names
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=session_steps,
    rate=st.sampled_from([1, 20, 150, 2000]),
    checkpoint=st.integers(100, 1500),
    max_tokens=st.integers(0, 20_000),
    min_first=st.sampled_from([0, 0, 100, 500, 2000]),
)
def test_sessions_obey_the_contract(
    steps: list[tuple[int, int, bool, bool]],
    rate: int,
    checkpoint: int,
    max_tokens: int,
    min_first: int,
) -> None:
    now = 1_700_000_000
    chain = Chain(max_tokens, rate, min_first, last_proof_time=now)
    metered = claimed = 0
    pending: int | None = None

    def ask(settling: bool) -> object:
        return decide(
            JobState(
                metered=metered,
                claimed=claimed,
                onchain_used=chain.tokens_used,
                budget=max(0, chain.max_tokens - chain.tokens_used),
                last_proof_time=chain.last_proof_time,
                now=now,
                rate=rate,
                checkpoint=checkpoint,
                settling=settling,
                min_first_claim=min_first if chain.tokens_used == 0 else 0,
            )
        )

    for dt, new_tokens, delayed, jump in steps:
        now += dt
        metered += new_tokens
        if pending is not None:  # mined now: block.timestamp only grows
            chain.accept(pending, now, metered)
            pending = None
        decision = ask(settling=False)
        if isinstance(decision, ClaimNow):
            assert decision.tokens >= min(checkpoint, max_tokens - chain.tokens_used)
            claimed += decision.tokens
            if delayed:
                pending = decision.tokens
            else:
                chain.accept(decision.tokens, now, metered)
        elif isinstance(decision, WaitUntil):
            assert decision.at > now
            assert rate_cap(chain.last_proof_time, decision.at, rate) >= decision.tokens
            if jump:
                now = decision.at
        else:
            assert not isinstance(decision, Settle)
        assert claimed <= metered and claimed <= max(max_tokens, chain.tokens_used)

    # Settle: it must end, with every metered token claimed or reported unclaimable.
    for _ in range(1000):
        if pending is not None:
            chain.accept(pending, now, metered)
            pending = None
        decision = ask(settling=True)
        if isinstance(decision, ClaimNow):
            claimed += decision.tokens
            chain.accept(decision.tokens, now, metered)
        elif isinstance(decision, WaitUntil):
            assert decision.at > now
            now = decision.at
        elif isinstance(decision, Settle):
            break
        else:
            pytest.fail(f"settlement stalled: {decision}")
    else:
        pytest.fail("settlement never ended")

    assert claimed == chain.tokens_used
    assert claimed + decision.unclaimable == metered
    assert decision.over_budget == max(0, metered - max_tokens)
    below_minimum = decision.unclaimable - decision.over_budget
    minimum = max(MIN_CLAIM_TOKENS, min_first) if chain.tokens_used == 0 else MIN_CLAIM_TOKENS
    assert below_minimum < minimum or chain.max_tokens - chain.tokens_used < minimum


@given(
    metered=st.integers(0, 10**7),
    claimed=st.integers(0, 10**7),
    onchain_used=st.integers(0, 10**7),
    budget=st.integers(0, 10**7),
    lpt_ago=st.integers(-100, 10**5),
    rate=st.integers(1, 3000),
    checkpoint=st.integers(100, 10**5),
    settling=st.booleans(),
    min_first=st.integers(0, 5000),
    claim_by=st.none() | st.integers(NOW - 100, NOW + 100),
)
def test_any_single_decision_is_within_the_rules(
    metered: int,
    claimed: int,
    onchain_used: int,
    budget: int,
    lpt_ago: int,
    rate: int,
    checkpoint: int,
    settling: bool,
    min_first: int,
    claim_by: int | None,
) -> None:
    s = JobState(
        metered=metered,
        claimed=claimed,
        onchain_used=onchain_used,
        budget=budget,
        last_proof_time=NOW - lpt_ago,
        now=NOW,
        rate=rate,
        checkpoint=checkpoint,
        settling=settling,
        min_first_claim=min_first,
        claim_by=claim_by,
    )
    decision = decide(s)
    done = max(claimed, onchain_used)
    if isinstance(decision, ClaimNow):
        assert claimed <= onchain_used  # never two in flight
        assert decision.tokens >= MIN_CLAIM_TOKENS
        if done == 0:
            assert decision.tokens >= min_first
        assert decision.tokens <= metered - done  # never an unmetered token
        assert done + decision.tokens <= onchain_used + budget  # never beyond the deposit
        assert decision.tokens <= rate_cap(s.last_proof_time, NOW, rate)  # never over the cap
    elif isinstance(decision, WaitUntil):
        assert decision.at > NOW
        assert decision.tokens >= MIN_CLAIM_TOKENS
        assert decision.tokens <= metered - done
    elif isinstance(decision, Settle):
        assert settling
        assert decision.unclaimable == max(0, metered - done)
        assert 0 <= decision.over_budget <= decision.unclaimable
    else:
        assert isinstance(decision, Idle)
        assert not (settling and decision.reason is not IdleReason.IN_FLIGHT)


def test_a_partial_claim_never_strands_a_remainder_under_the_minimum() -> None:
    """Seen in the demo: 198 unclaimed, the cap allowing 100; claiming 100 left 98 that the
    contract could never take. Wait for all of it, or leave at least the minimum."""
    base = JobState(
        metered=318, claimed=120, onchain_used=120, budget=10_000, last_proof_time=0, now=5, rate=20
    )
    assert decide(base) == WaitUntil(at=10, tokens=198)
    wider = JobState(
        metered=370,
        claimed=120,
        onchain_used=120,
        budget=10_000,
        last_proof_time=0,
        now=10,
        rate=20,
    )  # 250 unclaimed, cap 200
    assert decide(wider) == ClaimNow(150)  # 100 left: still claimable later
    urgent = JobState(
        metered=318,
        claimed=120,
        onchain_used=120,
        budget=10_000,
        last_proof_time=0,
        now=5,
        rate=20,
        claim_by=5,
    )
    assert decide(urgent) == ClaimNow(100)  # the session's timeout comes first
