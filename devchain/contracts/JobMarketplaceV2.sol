// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import "./HostEarnings.sol";

interface IProofSystemV2 {
    function markProofUsed(bytes32 proofHash, address prover, uint256 claimedTokens, bytes32 modelId)
        external
        returns (bool);
}

/// @title JobMarketplaceV2 (test double)
/// @notice Reproduces the session-job part of the latest public JobMarketplaceWithModelsUpgradeable
/// (proxy 0xD067719Ee4c514B5735d1aC0FfB46FECf2A9adA4, Base Sepolia; source in fabstir-compute-contracts,
/// src/JobMarketplaceWithModelsUpgradeable.sol after the February 2026 audit remediation): the ABI
/// of the functions and events the sidecar uses, the order of the checks and the short revert
/// strings of that source.
///
/// Revert strings, all taken from the public source:
///   constructor (public `initialize`): "Zero addr", "Bad fee", "Bad window"
///   admin setters:                     "Not admin", "Zero addr"
///   createSessionJobForModel:          "Low deposit", "Bad price", "Bad dur", "Bad interval",
///                                      "Bad timeout", "No host", "Over max", "Host not active",
///                                      "Low interval", "Low deposit", "Bad model"
///   submitProofOfWork:                 "No proof sys", "Not active", "Not host", "Host not active",
///                                      "Min tokens", "Low first", "Too many", "Over dep",
///                                      "Proof already used" (and the proof system's "Unauthorized"
///                                      when the marketplace is not its authorized caller)
///   completeSessionJob:                "Not active", "Not depositor or host", "Dispute wait",
///                                      "Tx fail" (HostEarnings refused the host's payment)
///   triggerSessionTimeout:             "Not active", "Not timeout"
///   getProofSubmission:                "Bad index"
///
/// Differences from the public contract, each on purpose:
/// - no proxy: a plain contract whose constructor takes what `initialize` takes, plus the
///   claim-rate cap (public: ModelRegistry.getModelRateLimit, 1000 tokens/s times 2 by default);
/// - no NodeRegistry/ModelRegistry: every host counts as registered and active unless the admin
///   calls `setHostActive(host, false)`; a model is approved by `setModelApproved` (the public
///   "No host reg", "No model" and "Low price" checks have no counterpart here);
/// - native ETH deposits only, no pause, no delegates, no early-cancellation fee (minTokensFee 0);
/// - a refund that the depositor's account refuses is credited to `userDepositsNative`, as in the
///   public contract, but there is no withdrawal function for it.
contract JobMarketplaceV2 {
    enum SessionStatus {
        Active,
        Completed,
        TimedOut
    }

    struct ProofSubmission {
        bytes32 proofHash;
        uint256 tokensClaimed;
        uint256 timestamp;
        bool verified;
        string deltaCID;
    }

    // Field order is the public `sessionJobs(uint256)` getter's order; the getter skips `proofs`.
    struct SessionJob {
        uint256 id;
        address depositor;
        address host;
        address paymentToken;
        uint256 deposit;
        uint256 pricePerToken;
        uint256 tokensUsed;
        uint256 maxDuration;
        uint256 startTime;
        uint256 lastProofTime;
        uint256 proofInterval;
        uint256 proofTimeoutWindow;
        SessionStatus status;
        ProofSubmission[] proofs;
        uint256 withdrawnByHost;
        uint256 refundedToUser;
        string conversationCID;
        bytes32 lastProofHash;
        string lastProofCID;
    }

    uint256 public constant MIN_DEPOSIT = 0.0001 ether;
    uint256 public constant MIN_PROVEN_TOKENS = 100;
    uint256 public constant DEFAULT_PROOF_TIMEOUT = 300;
    uint256 public constant MIN_PROOF_TIMEOUT = 60;
    uint256 public constant MAX_PROOF_TIMEOUT = 3600;
    /// @notice Prices carry three extra decimals: payment = tokensUsed * pricePerToken / 1000.
    uint256 public constant PRICE_PRECISION = 1000;

    /// @notice Seconds after the last proof before the host may complete (the depositor: at once).
    uint256 public disputeWindow;
    uint256 public feeBasisPoints;
    /// @notice Claim-rate cap in tokens per second since the last proof (public default 2000).
    uint256 public immutable maxTokensPerSecond;

    mapping(uint256 => SessionJob) public sessionJobs;
    mapping(uint256 => bytes32) public sessionModel;
    uint256 public nextJobId = 1;
    address public owner;
    address public treasuryAddress;
    uint256 public accumulatedTreasuryNative;
    mapping(address => uint256) public userDepositsNative;

    IProofSystemV2 public proofSystem;
    HostEarnings public hostEarnings;

    mapping(bytes32 => bool) private approvedModels;
    mapping(address => bool) private inactiveHosts;

    event SessionJobCreated(uint256 indexed jobId, address indexed depositor, address indexed host, uint256 deposit);
    event SessionJobCreatedForModel(
        uint256 indexed jobId, address indexed depositor, address indexed host, bytes32 modelId, uint256 deposit
    );
    event ProofSubmitted(
        uint256 indexed jobId,
        address indexed host,
        uint256 tokensClaimed,
        bytes32 proofHash,
        string proofCID,
        string deltaCID
    );
    event SessionCompleted(uint256 indexed jobId, uint256 totalTokensUsed, uint256 hostEarnings, uint256 userRefund);
    event SessionCompletedBy(
        uint256 indexed jobId, address indexed completedBy, uint256 tokensUsed, uint256 paymentAmount, uint256 refundAmount
    );
    event SessionTimedOut(uint256 indexed jobId, uint256 hostEarnings, uint256 userRefund);
    event RefundCreditedToDeposit(uint256 indexed jobId, address indexed depositor, uint256 amount, address indexed token);

    constructor(address payable _hostEarnings, uint256 _feeBasisPoints, uint256 _disputeWindow, uint256 _maxTokensPerSecond) {
        require(_hostEarnings != address(0), "Zero addr");
        require(_feeBasisPoints <= 10000, "Bad fee");
        require(_disputeWindow > 0 && _disputeWindow <= 7 days, "Bad window");
        hostEarnings = HostEarnings(_hostEarnings);
        feeBasisPoints = _feeBasisPoints;
        disputeWindow = _disputeWindow;
        maxTokensPerSecond = _maxTokensPerSecond;
        owner = msg.sender;
        treasuryAddress = msg.sender;
    }

    modifier onlyAdmin() {
        require(msg.sender == treasuryAddress || msg.sender == owner, "Not admin");
        _;
    }

    function setProofSystem(address _proofSystem) external onlyAdmin {
        require(_proofSystem != address(0), "Zero addr");
        proofSystem = IProofSystemV2(_proofSystem);
    }

    /// @notice Stands in for ModelRegistry approval.
    function setModelApproved(bytes32 modelId, bool approved) external onlyAdmin {
        approvedModels[modelId] = approved;
    }

    /// @notice Stands in for the NodeRegistry's active flag (every host is active by default).
    function setHostActive(address host, bool active) external onlyAdmin {
        inactiveHosts[host] = !active;
    }

    function isModelApproved(bytes32 modelId) external view returns (bool) {
        return approvedModels[modelId];
    }

    function isActiveNode(address host) public view returns (bool) {
        return !inactiveHosts[host];
    }

    function createSessionJobForModel(
        address host,
        bytes32 modelId,
        uint256 pricePerToken,
        uint256 maxDuration,
        uint256 proofInterval,
        uint256 proofTimeoutWindow
    ) external payable returns (uint256 jobId) {
        require(msg.value >= MIN_DEPOSIT, "Low deposit");
        // _validateSessionParams, in the public order.
        require(pricePerToken > 0, "Bad price");
        require(maxDuration > 0 && maxDuration <= 365 days, "Bad dur");
        require(proofInterval > 0, "Bad interval");
        require(
            proofTimeoutWindow >= MIN_PROOF_TIMEOUT && proofTimeoutWindow <= MAX_PROOF_TIMEOUT, "Bad timeout"
        );
        require(host != address(0), "No host");
        require(msg.value <= 1000 ether, "Over max");
        require(isActiveNode(host), "Host not active");
        // In v2 proofInterval counts tokens (v1: seconds, times 10 tokens).
        uint256 maxTokens = (msg.value * PRICE_PRECISION) / pricePerToken;
        require(proofInterval >= MIN_PROVEN_TOKENS, "Low interval");
        require(maxTokens >= proofInterval, "Low deposit");
        require(approvedModels[modelId], "Bad model");

        jobId = nextJobId++;
        sessionModel[jobId] = modelId;
        SessionJob storage session = sessionJobs[jobId];
        session.id = jobId;
        session.depositor = msg.sender;
        session.host = host;
        session.paymentToken = address(0);
        session.deposit = msg.value;
        session.pricePerToken = pricePerToken;
        session.maxDuration = maxDuration;
        session.startTime = block.timestamp;
        session.lastProofTime = block.timestamp;
        session.proofInterval = proofInterval;
        session.proofTimeoutWindow = proofTimeoutWindow;
        session.status = SessionStatus.Active;

        emit SessionJobCreated(jobId, msg.sender, host, msg.value);
        emit SessionJobCreatedForModel(jobId, msg.sender, host, modelId, msg.value);
    }

    /// @notice `tokensClaimed` is a delta: it is added to `tokensUsed`.
    function submitProofOfWork(
        uint256 jobId,
        uint256 tokensClaimed,
        bytes32 proofHash,
        string calldata proofCID,
        string calldata deltaCID
    ) external {
        require(address(proofSystem) != address(0), "No proof sys");
        SessionJob storage session = sessionJobs[jobId];
        require(session.status == SessionStatus.Active, "Not active");
        require(msg.sender == session.host, "Not host");
        require(isActiveNode(session.host), "Host not active");
        require(tokensClaimed >= MIN_PROVEN_TOKENS, "Min tokens");
        // The first proof must cover at least one proof interval (minimum billing).
        if (session.tokensUsed == 0) {
            require(tokensClaimed >= session.proofInterval, "Low first");
        }

        uint256 timeSinceLastProof = block.timestamp - session.lastProofTime;
        require(tokensClaimed <= timeSinceLastProof * maxTokensPerSecond, "Too many");

        uint256 newTotal = session.tokensUsed + tokensClaimed;
        require(newTotal <= (session.deposit * PRICE_PRECISION) / session.pricePerToken, "Over dep");

        // Replay protection across all sessions lives in the proof system (no per-session scan:
        // unlike v1, the gas of a claim does not grow with the claims before it).
        require(proofSystem.markProofUsed(proofHash, msg.sender, tokensClaimed, sessionModel[jobId]), "Proof already used");
        session.lastProofHash = proofHash;
        session.lastProofCID = proofCID;
        session.proofs.push(
            ProofSubmission({
                proofHash: proofHash,
                tokensClaimed: tokensClaimed,
                timestamp: block.timestamp,
                verified: true,
                deltaCID: deltaCID
            })
        );
        session.tokensUsed = newTotal;
        session.lastProofTime = block.timestamp;

        emit ProofSubmitted(jobId, msg.sender, tokensClaimed, proofHash, proofCID, deltaCID);
    }

    function completeSessionJob(uint256 jobId, string calldata conversationCID) external {
        SessionJob storage session = sessionJobs[jobId];
        require(session.status == SessionStatus.Active, "Not active");
        require(msg.sender == session.depositor || msg.sender == session.host, "Not depositor or host");
        // The public source counts the window from the LAST PROOF (not the start, as v1 does).
        if (msg.sender != session.depositor) {
            require(block.timestamp >= session.lastProofTime + disputeWindow, "Dispute wait");
        }

        session.status = SessionStatus.Completed;
        session.conversationCID = conversationCID;
        _settleSessionPayments(jobId, msg.sender);
    }

    /// @notice Anyone may end a session past its maximum duration, or one whose host has not
    /// proven anything for `proofTimeoutWindow` seconds; it settles like a completion.
    function triggerSessionTimeout(uint256 jobId) external {
        SessionJob storage session = sessionJobs[jobId];
        require(session.status == SessionStatus.Active, "Not active");
        uint256 timeoutWindow = session.proofTimeoutWindow > 0 ? session.proofTimeoutWindow : DEFAULT_PROOF_TIMEOUT;
        bool hasTimedOut = (block.timestamp > session.startTime + session.maxDuration)
            || (block.timestamp > session.lastProofTime + timeoutWindow);
        require(hasTimedOut, "Not timeout");

        session.status = SessionStatus.TimedOut;
        _settleSessionPayments(jobId, msg.sender);
        emit SessionTimedOut(jobId, session.withdrawnByHost, session.refundedToUser);
    }

    function getProofSubmission(uint256 sessionId, uint256 proofIndex)
        external
        view
        returns (bytes32 proofHash, uint256 tokensClaimed, uint256 timestamp, bool verified, string memory deltaCID)
    {
        SessionJob storage session = sessionJobs[sessionId];
        require(proofIndex < session.proofs.length, "Bad index");
        ProofSubmission storage proof = session.proofs[proofIndex];
        return (proof.proofHash, proof.tokensClaimed, proof.timestamp, proof.verified, proof.deltaCID);
    }

    function _settleSessionPayments(uint256 jobId, address completedBy) internal {
        SessionJob storage session = sessionJobs[jobId];

        // The public contract bills at least one proof interval once a proof exists; "Low first"
        // already guarantees tokensUsed >= proofInterval then, so billing is tokensUsed here.
        uint256 hostPayment = (session.tokensUsed * session.pricePerToken) / PRICE_PRECISION;
        uint256 userRefund = session.deposit > hostPayment ? session.deposit - hostPayment : 0;

        if (hostPayment > 0) {
            uint256 treasuryFee = (hostPayment * feeBasisPoints) / 10000;
            uint256 netToHost = hostPayment - treasuryFee;
            accumulatedTreasuryNative += treasuryFee;
            (bool sent, ) = payable(address(hostEarnings)).call{value: netToHost}("");
            require(sent, "Tx fail");
            hostEarnings.creditEarnings(session.host, netToHost, address(0));
            session.withdrawnByHost = netToHost;
        }

        if (userRefund > 0) {
            session.refundedToUser = userRefund;
            (bool sent, ) = payable(session.depositor).call{value: userRefund}("");
            if (!sent) {
                // Pull pattern of the public contract: a refused refund stays claimable.
                userDepositsNative[session.depositor] += userRefund;
                emit RefundCreditedToDeposit(jobId, session.depositor, userRefund, address(0));
            }
        }

        emit SessionCompleted(jobId, session.tokensUsed, session.withdrawnByHost, userRefund);
        emit SessionCompletedBy(jobId, completedBy, session.tokensUsed, hostPayment, userRefund);
    }
}
