// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title HostEarnings (test double)
/// @notice Reproduces the public Fabstir HostEarnings contract (fabstir-compute-contracts,
/// src/HostEarnings.sol) as far as the sidecar and its tests need it: the marketplace credits a
/// host's net earnings here on settlement (event `EarningsCredited`), the host withdraws later,
/// and `getBalance(host, token)` reads the balance. Only the native token (address(0)) is held:
/// the doubles take deposits in ETH only.
contract HostEarnings {
    address public owner;

    // host => token => amount; token address(0) is the native token.
    mapping(address => mapping(address => uint256)) private earnings;
    mapping(address => uint256) public totalAccumulated;
    mapping(address => uint256) public totalWithdrawn;
    mapping(address => bool) public authorizedCallers;

    event EarningsCredited(address indexed host, address indexed token, uint256 amount, uint256 newBalance);
    event EarningsWithdrawn(address indexed host, address indexed token, uint256 amount, uint256 remainingBalance);
    event CallerAuthorized(address indexed caller, bool authorized);

    constructor() {
        owner = msg.sender;
    }

    /// @notice Let a marketplace credit earnings (the public contract's owner-only setter).
    function setAuthorizedCaller(address caller, bool authorized) external {
        require(msg.sender == owner, "Only owner");
        require(caller != address(0), "Invalid caller address");
        authorizedCallers[caller] = authorized;
        emit CallerAuthorized(caller, authorized);
    }

    /// @notice Credit `amount` to `host`; the marketplace has sent the ETH just before.
    function creditEarnings(address host, uint256 amount, address token) external {
        require(authorizedCallers[msg.sender], "Not authorized to credit earnings");
        require(host != address(0), "Invalid host address");
        require(amount > 0, "Amount must be positive");
        earnings[host][token] += amount;
        totalAccumulated[token] += amount;
        emit EarningsCredited(host, token, amount, earnings[host][token]);
    }

    function withdraw(uint256 amount, address token) external {
        require(amount > 0, "Amount must be positive");
        require(earnings[msg.sender][token] >= amount, "Insufficient earnings");
        _pay(token, amount);
        emit EarningsWithdrawn(msg.sender, token, amount, earnings[msg.sender][token]);
    }

    function withdrawAll(address token) external {
        uint256 amount = earnings[msg.sender][token];
        require(amount > 0, "No earnings to withdraw");
        _pay(token, amount);
        emit EarningsWithdrawn(msg.sender, token, amount, 0);
    }

    function getBalance(address host, address token) external view returns (uint256) {
        return earnings[host][token];
    }

    function _pay(address token, uint256 amount) private {
        // The double holds no ERC20 tokens: only the native token can be withdrawn.
        require(token == address(0), "Only native token");
        // Effects before the transfer: the receiver cannot re-enter and withdraw twice.
        earnings[msg.sender][token] -= amount;
        totalWithdrawn[token] += amount;
        (bool success, ) = payable(msg.sender).call{value: amount}("");
        require(success, "ETH transfer failed");
    }

    /// @notice The marketplace sends the host's net payment here before crediting it.
    receive() external payable {}
}
