// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title ProofSystemV1 (test double)
/// @notice The proof check the v1 marketplace (0x1273E...) calls, as the public ProofSystem
/// (fabstir-compute-contracts, src/ProofSystem.sol) does it: a proof is accepted when it has at
/// least 64 bytes and its first 32 bytes are not already recorded as a verified proof. The v1
/// marketplace only calls the view `verifyEKZL`, so nothing is recorded by a claim itself;
/// `recordVerifiedProof` (open to anyone, as in the public contract) is how a test makes a proof
/// "already verified" and reaches the marketplace's `Invalid proof`.
contract ProofSystemV1 {
    mapping(bytes32 => bool) public verifiedProofs;

    event ProofVerified(bytes32 indexed proofHash, address indexed prover, uint256 tokens);

    function verifyEKZL(bytes calldata proof, address prover, uint256 claimedTokens) external view returns (bool) {
        if (proof.length < 64) return false;
        if (claimedTokens == 0) return false;
        if (prover == address(0)) return false;
        return !verifiedProofs[bytes32(proof[:32])];
    }

    function recordVerifiedProof(bytes32 proofHash) external {
        verifiedProofs[proofHash] = true;
        emit ProofVerified(proofHash, msg.sender, 0);
    }
}
