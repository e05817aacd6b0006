// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title ModelRegistry (test double)
/// @notice The marketplace's ModelRegistry as far as host registration needs it: which model
/// ids (keccak256 of "repo/file") are approved. The owner approves them.
contract ModelRegistry {
    address public immutable owner;
    mapping(bytes32 => bool) public approved;

    event ModelApproved(bytes32 indexed modelId, bool approved);

    constructor() {
        owner = msg.sender;
    }

    function setModelApproved(bytes32 modelId, bool isApproved) external {
        require(msg.sender == owner, "Only owner");
        approved[modelId] = isApproved;
        emit ModelApproved(modelId, isApproved);
    }

    function isModelApproved(bytes32 modelId) external view returns (bool) {
        return approved[modelId];
    }
}
