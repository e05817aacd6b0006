// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import "./HostEarnings.sol";

interface IProofSystemV1 {
    function verifyEKZL(bytes calldata proof, address prover, uint256 claimedTokens) external view returns (bool);
}

/// @title JobMarketplaceV1 (test double)
/// @notice Reproduces the session-job part of the public JobMarketplaceWithModels deployed at
/// 0x1273E6358aa52Bb5B160c34Bf2e617B745e4A944 (Base Sepolia): the ABI of the functions and events
/// the sidecar uses, their checks in the public contract's order and their exact revert strings
/// (see ../../shared/FACTS.md section 1, "v1").
///
/// Differences from the public contract, each on purpose:
/// - the claim-rate cap (public: 10 tokens/s times 2) and the dispute window (public: 1 h, later
///   a constructor argument) are constructor arguments, so tests can use small values;
/// - the treasury fee is fixed at 250 basis points; the treasury is the deployer;
/// - deposits are native ETH only (no USDC sessions, no node registry: the v1 contract did not
///   check the host against a registry either);
/// - only host or requester may complete (`Unauthorized`), as FACTS.md records for v1;
/// - `SessionCompleted` is emitted in its 4-field form only (the sidecar's event).
contract JobMarketplaceV1 {
    enum SessionStatus {
        Active,
        Completed,
        TimedOut,
        Disputed,
        Abandoned,
        Cancelled
    }

    struct ProofSubmission {
        bytes32 proofHash;
        uint256 tokensClaimed;
        uint256 timestamp;
        bool verified;
    }

    // Field order is the public `sessionJobs(uint256)` getter's order; the getter skips `proofs`.
    struct SessionJob {
        uint256 id;
        address requester;
        address host;
        address paymentToken;
        uint256 deposit;
        uint256 pricePerToken;
        uint256 tokensUsed;
        uint256 maxDuration;
        uint256 startTime;
        uint256 lastProofTime;
        uint256 proofInterval;
        SessionStatus status;
        ProofSubmission[] proofs;
        uint256 withdrawnByHost;
        uint256 refundedToUser;
        string conversationCID;
    }

    uint256 public constant MIN_DEPOSIT = 0.0002 ether;
    uint256 public constant MIN_PROVEN_TOKENS = 100;
    uint256 public constant FEE_BASIS_POINTS = 250;
    /// @notice Claim-rate cap in tokens per second since the last proof (public: 10 * 2 = 20).
    uint256 public immutable MAX_TOKENS_PER_SECOND;
    /// @notice Seconds after the session's start before the host may complete it.
    uint256 public immutable DISPUTE_WINDOW;

    mapping(uint256 => SessionJob) public sessionJobs;
    uint256 public nextJobId = 1;
    address public treasuryAddress;
    uint256 public accumulatedTreasuryETH;

    IProofSystemV1 public proofSystem;
    HostEarnings public hostEarnings;

    event SessionJobCreated(uint256 indexed jobId, address indexed requester, address indexed host, uint256 deposit);
    event ProofSubmitted(uint256 indexed jobId, address indexed host, uint256 tokensClaimed, bytes32 proofHash);
    event SessionCompleted(uint256 indexed jobId, uint256 totalTokensUsed, uint256 hostEarnings, uint256 userRefund);
    event SessionTimedOut(uint256 indexed jobId, uint256 hostEarnings, uint256 userRefund);

    constructor(address payable _hostEarnings, uint256 _maxTokensPerSecond, uint256 _disputeWindow) {
        hostEarnings = HostEarnings(_hostEarnings);
        MAX_TOKENS_PER_SECOND = _maxTokensPerSecond;
        DISPUTE_WINDOW = _disputeWindow;
        treasuryAddress = msg.sender;
    }

    function setProofSystem(address _proofSystem) external {
        require(msg.sender == treasuryAddress, "Only treasury");
        proofSystem = IProofSystemV1(_proofSystem);
    }

    function createSessionJob(address host, uint256 pricePerToken, uint256 maxDuration, uint256 proofInterval)
        external
        payable
        returns (uint256 jobId)
    {
        require(msg.value >= MIN_DEPOSIT, "Insufficient deposit");
        require(msg.value <= 1000 ether, "Deposit too large");
        require(pricePerToken > 0, "Invalid price");
        require(maxDuration > 0 && maxDuration <= 365 days, "Invalid duration");
        require(proofInterval > 0, "Invalid proof interval");
        require(host != address(0), "Invalid host");

        uint256 maxTokens = msg.value / pricePerToken;
        uint256 tokensPerProof = proofInterval * 10;
        require(tokensPerProof >= MIN_PROVEN_TOKENS, "Proof interval too small");
        require(maxTokens >= tokensPerProof, "Deposit too small for proof interval");

        jobId = nextJobId++;
        SessionJob storage session = sessionJobs[jobId];
        session.id = jobId;
        session.requester = msg.sender;
        session.host = host;
        session.paymentToken = address(0);
        session.deposit = msg.value;
        session.pricePerToken = pricePerToken;
        session.maxDuration = maxDuration;
        session.startTime = block.timestamp;
        session.lastProofTime = block.timestamp;
        session.proofInterval = proofInterval;
        session.status = SessionStatus.Active;

        emit SessionJobCreated(jobId, msg.sender, host, msg.value);
    }

    /// @notice `tokensClaimed` is a delta: it is added to `tokensUsed`.
    function submitProofOfWork(uint256 jobId, uint256 tokensClaimed, bytes calldata proof) external {
        SessionJob storage session = sessionJobs[jobId];
        require(session.status == SessionStatus.Active, "Session not active");
        require(msg.sender == session.host, "Only host can submit proof");
        require(tokensClaimed >= MIN_PROVEN_TOKENS, "Must claim minimum tokens");

        uint256 timeSinceLastProof = block.timestamp - session.lastProofTime;
        require(tokensClaimed <= timeSinceLastProof * MAX_TOKENS_PER_SECOND, "Excessive tokens claimed");

        uint256 newTotal = session.tokensUsed + tokensClaimed;
        require(newTotal <= session.deposit / session.pricePerToken, "Exceeds deposit");

        // The public contract scans every earlier proof of the session, so the gas of a claim
        // grows with the number of claims before it; the sidecar must estimate gas per claim.
        bytes32 proofHash = keccak256(proof);
        for (uint256 i = 0; i < session.proofs.length; i++) {
            require(session.proofs[i].proofHash != proofHash, "Proof already submitted");
        }

        require(address(proofSystem) != address(0), "Proof system not set");
        require(proofSystem.verifyEKZL(proof, msg.sender, tokensClaimed), "Invalid proof");

        session.proofs.push(
            ProofSubmission({proofHash: proofHash, tokensClaimed: tokensClaimed, timestamp: block.timestamp, verified: true})
        );
        session.tokensUsed = newTotal;
        session.lastProofTime = block.timestamp;

        emit ProofSubmitted(jobId, msg.sender, tokensClaimed, proofHash);
    }

    function completeSessionJob(uint256 jobId, string calldata conversationCID) external {
        SessionJob storage session = sessionJobs[jobId];
        require(session.status == SessionStatus.Active, "Session not active");
        require(msg.sender == session.host || msg.sender == session.requester, "Unauthorized");
        // The requester may end at once; the host waits so the requester can dispute first.
        if (msg.sender != session.requester) {
            require(block.timestamp >= session.startTime + DISPUTE_WINDOW, "Must wait dispute window");
        }

        session.status = SessionStatus.Completed;
        session.conversationCID = conversationCID;
        _settleSessionPayments(jobId);
    }

    /// @notice Anyone may end a session whose maximum duration has passed, or whose host has not
    /// proven anything for three proof intervals; it settles like a completion.
    function triggerSessionTimeout(uint256 jobId) external {
        SessionJob storage session = sessionJobs[jobId];
        require(session.status == SessionStatus.Active, "Session not active");
        bool hasTimedOut = (block.timestamp > session.startTime + session.maxDuration)
            || (block.timestamp > session.lastProofTime + session.proofInterval * 3);
        require(hasTimedOut, "Session not timed out");

        session.status = SessionStatus.TimedOut;
        _settleSessionPayments(jobId);
        emit SessionTimedOut(jobId, session.withdrawnByHost, session.refundedToUser);
    }

    /// @notice Number of proofs recorded for a session (for tests and audits).
    function getProofCount(uint256 jobId) external view returns (uint256) {
        return sessionJobs[jobId].proofs.length;
    }

    function _settleSessionPayments(uint256 jobId) internal {
        SessionJob storage session = sessionJobs[jobId];

        uint256 hostPayment = session.tokensUsed * session.pricePerToken;
        uint256 userRefund = session.deposit > hostPayment ? session.deposit - hostPayment : 0;

        if (hostPayment > 0) {
            // The fee is rounded down, so any remainder of a wei goes to the host.
            uint256 treasuryFee = (hostPayment * FEE_BASIS_POINTS) / 10000;
            uint256 netHostPayment = hostPayment - treasuryFee;
            accumulatedTreasuryETH += treasuryFee;
            // The ETH goes to HostEarnings first, then is credited; the host withdraws later.
            (bool sent, ) = payable(address(hostEarnings)).call{value: netHostPayment}("");
            require(sent, "ETH transfer to HostEarnings failed");
            hostEarnings.creditEarnings(session.host, netHostPayment, address(0));
            session.withdrawnByHost = netHostPayment;
        }

        if (userRefund > 0) {
            (bool sent, ) = payable(session.requester).call{value: userRefund}("");
            require(sent, "ETH refund failed");
            session.refundedToUser = userRefund;
        }

        emit SessionCompleted(jobId, session.tokensUsed, session.withdrawnByHost, userRefund);
    }
}
