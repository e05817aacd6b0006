// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title RejectingForwarder (test helper, not part of any public contract)
/// @notice A contract account that refuses ETH. Tests act through it as a requester or a host
/// to reach the paths where a payment to that account fails (v1 `ETH refund failed`, v2's
/// refund credited to the deposit balance, HostEarnings' `ETH transfer failed`). `forward`
/// calls `target` with `data` and re-raises the target's revert data unchanged, so the revert
/// string a test sees is the target's own.
contract RejectingForwarder {
    function forward(address target, bytes calldata data) external payable returns (bytes memory) {
        (bool ok, bytes memory ret) = target.call{value: msg.value}(data);
        if (!ok) {
            assembly {
                revert(add(ret, 32), mload(ret))
            }
        }
        return ret;
    }

    receive() external payable {
        revert("Rejects ETH");
    }
}
