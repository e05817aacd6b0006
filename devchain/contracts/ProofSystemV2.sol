// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title ProofSystemV2 (test double)
/// @notice The replay guard of the latest public marketplace: `markProofUsed` records a
/// proofHash once for all sessions and answers false when it was used before (the marketplace
/// then reverts with `Proof already used`). Only authorized callers (the marketplace) may mark
/// proofs, as in the public ProofSystemUpgradeable; an unauthorized marketplace gets
/// `Unauthorized`, the configuration fault the public SDK documents.
contract ProofSystemV2 {
    address public owner;
    mapping(bytes32 => bool) public verifiedProofs;
    mapping(address => bool) public authorizedCallers;

    event ProofVerified(bytes32 indexed proofHash, address indexed prover, uint256 tokens);
    event AuthorizedCallerUpdated(address indexed caller, bool authorized);

    constructor() {
        owner = msg.sender;
    }

    function setAuthorizedCaller(address caller, bool authorized) external {
        require(msg.sender == owner, "Only owner");
        require(caller != address(0), "Invalid caller");
        authorizedCallers[caller] = authorized;
        emit AuthorizedCallerUpdated(caller, authorized);
    }

    function markProofUsed(bytes32 proofHash, address prover, uint256 claimedTokens, bytes32)
        external
        returns (bool)
    {
        require(authorizedCallers[msg.sender], "Unauthorized");
        if (verifiedProofs[proofHash]) return false;
        verifiedProofs[proofHash] = true;
        emit ProofVerified(proofHash, prover, claimedTokens);
        return true;
    }
}
