// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

interface IStakeToken {
    function transferFrom(address from, address to, uint256 amount) external returns (bool);
    function transfer(address to, uint256 amount) external returns (bool);
}

interface IModelRegistry {
    function isModelApproved(bytes32 modelId) external view returns (bool);
}

/// @title NodeRegistry (test double)
/// @notice Reproduces NodeRegistryWithModelsUpgradeable as the marketplace SDK's current client
/// ABI describes it (the "Phase 18" per-model, per-token pricing; ../shared/NODE_PROTOCOL.md
/// §5-6.3) as far as a host registers, updates and is discovered: the stake of MIN_STAKE FAB
/// taken with transferFrom, the price ranges, approved models only, the public `nodes` getter
/// (which leaves out the model array), and getModelPricing reverting "No model pricing" for a
/// model and token the host has not priced (the SDK drops such hosts). Revert strings are the
/// public contract's. Not reproduced: upgradeability, slashing, the Phase-17 pricing calls.
contract NodeRegistry {
    uint256 public constant MIN_STAKE = 1000 * 10 ** 18;
    uint256 public constant PRICE_PRECISION = 1000;
    uint256 public constant MIN_PRICE_PER_TOKEN_STABLE = 1;
    uint256 public constant MAX_PRICE_PER_TOKEN_STABLE = 100_000_000;
    uint256 public constant MIN_PRICE_PER_TOKEN_NATIVE = 227_273;
    uint256 public constant MAX_PRICE_PER_TOKEN_NATIVE = 22_727_272_727_273_000;

    struct Node {
        address operator;
        uint256 stakedAmount;
        bool active;
        string metadata;
        string apiUrl;
        bytes32[] supportedModels;
        uint256 minPricePerTokenNative;
        uint256 minPricePerTokenStable;
    }

    IStakeToken public immutable fabToken;
    IModelRegistry public immutable modelRegistry;

    mapping(address => Node) public nodes;
    mapping(bytes32 => address[]) private modelToNodes;
    address[] private activeNodesList;
    // operator => model => token => price (0: unset)
    mapping(address => mapping(bytes32 => mapping(address => uint256))) private modelTokenPricing;

    event NodeRegistered(address indexed operator, uint256 stakedAmount, string metadata, bytes32[] models);
    event NodeUnregistered(address indexed operator, uint256 returnedAmount);
    event MetadataUpdated(address indexed operator, string newMetadata);
    event ApiUrlUpdated(address indexed operator, string newApiUrl);
    event ModelsUpdated(address indexed operator, bytes32[] newModels);
    event ModelTokenPricingUpdated(
        address indexed operator, bytes32 indexed modelId, address indexed token, uint256 price
    );

    constructor(address fabToken_, address modelRegistry_) {
        require(fabToken_ != address(0), "Invalid FAB token address");
        require(modelRegistry_ != address(0), "Invalid model registry address");
        fabToken = IStakeToken(fabToken_);
        modelRegistry = IModelRegistry(modelRegistry_);
    }

    modifier registered() {
        require(nodes[msg.sender].operator != address(0), "Not registered");
        _;
    }

    function registerNode(
        string memory metadata,
        string memory apiUrl,
        bytes32[] memory modelIds,
        uint256 minPricePerTokenNative,
        uint256 minPricePerTokenStable
    ) external {
        require(nodes[msg.sender].operator == address(0), "Already registered");
        require(bytes(metadata).length > 0, "Empty metadata");
        require(bytes(apiUrl).length > 0, "Empty API URL");
        require(modelIds.length > 0, "Must support at least one model");
        require(minPricePerTokenNative >= MIN_PRICE_PER_TOKEN_NATIVE, "Native price below minimum");
        require(minPricePerTokenNative <= MAX_PRICE_PER_TOKEN_NATIVE, "Native price above maximum");
        require(minPricePerTokenStable >= MIN_PRICE_PER_TOKEN_STABLE, "Stable price below minimum");
        require(minPricePerTokenStable <= MAX_PRICE_PER_TOKEN_STABLE, "Stable price above maximum");
        for (uint256 i = 0; i < modelIds.length; i++) {
            require(modelRegistry.isModelApproved(modelIds[i]), "Model not approved");
        }
        require(fabToken.transferFrom(msg.sender, address(this), MIN_STAKE), "Stake transfer failed");
        Node storage node = nodes[msg.sender];
        node.operator = msg.sender;
        node.stakedAmount = MIN_STAKE;
        node.active = true;
        node.metadata = metadata;
        node.apiUrl = apiUrl;
        node.supportedModels = modelIds;
        node.minPricePerTokenNative = minPricePerTokenNative;
        node.minPricePerTokenStable = minPricePerTokenStable;
        activeNodesList.push(msg.sender);
        for (uint256 i = 0; i < modelIds.length; i++) {
            modelToNodes[modelIds[i]].push(msg.sender);
        }
        emit NodeRegistered(msg.sender, MIN_STAKE, metadata, modelIds);
    }

    function updateMetadata(string memory newMetadata) external registered {
        require(bytes(newMetadata).length > 0, "Empty metadata");
        nodes[msg.sender].metadata = newMetadata;
        emit MetadataUpdated(msg.sender, newMetadata);
    }

    function updateApiUrl(string memory newApiUrl) external registered {
        require(bytes(newApiUrl).length > 0, "Empty API URL");
        nodes[msg.sender].apiUrl = newApiUrl;
        emit ApiUrlUpdated(msg.sender, newApiUrl);
    }

    function updateSupportedModels(bytes32[] memory newModelIds) external registered {
        require(newModelIds.length > 0, "Must support at least one model");
        for (uint256 i = 0; i < newModelIds.length; i++) {
            require(modelRegistry.isModelApproved(newModelIds[i]), "Model not approved");
        }
        bytes32[] memory old = nodes[msg.sender].supportedModels;
        for (uint256 i = 0; i < old.length; i++) {
            _removeFrom(modelToNodes[old[i]], msg.sender);
        }
        nodes[msg.sender].supportedModels = newModelIds;
        for (uint256 i = 0; i < newModelIds.length; i++) {
            modelToNodes[newModelIds[i]].push(msg.sender);
        }
        emit ModelsUpdated(msg.sender, newModelIds);
    }

    /// @notice A host's price for one model in one token (address(0): the native token).
    function setModelTokenPricing(bytes32 modelId, address token, uint256 price) external registered {
        require(nodes[msg.sender].active, "Node not active");
        require(_supports(msg.sender, modelId), "Model not supported");
        if (token == address(0)) {
            require(price >= MIN_PRICE_PER_TOKEN_NATIVE, "Native price below minimum");
            require(price <= MAX_PRICE_PER_TOKEN_NATIVE, "Native price above maximum");
        } else {
            require(price >= MIN_PRICE_PER_TOKEN_STABLE, "Stable price below minimum");
            require(price <= MAX_PRICE_PER_TOKEN_STABLE, "Stable price above maximum");
        }
        modelTokenPricing[msg.sender][modelId][token] = price;
        emit ModelTokenPricingUpdated(msg.sender, modelId, token, price);
    }

    function clearModelTokenPricing(bytes32 modelId, address token) external registered {
        delete modelTokenPricing[msg.sender][modelId][token];
        emit ModelTokenPricingUpdated(msg.sender, modelId, token, 0);
    }

    function stake(uint256 amount) external registered {
        require(amount > 0, "Zero amount");
        require(fabToken.transferFrom(msg.sender, address(this), amount), "Stake transfer failed");
        nodes[msg.sender].stakedAmount += amount;
    }

    function unregisterNode() external registered {
        uint256 returned = nodes[msg.sender].stakedAmount;
        bytes32[] memory models = nodes[msg.sender].supportedModels;
        for (uint256 i = 0; i < models.length; i++) {
            _removeFrom(modelToNodes[models[i]], msg.sender);
        }
        _removeFrom(activeNodesList, msg.sender);
        delete nodes[msg.sender];
        require(fabToken.transfer(msg.sender, returned), "Stake return failed");
        emit NodeUnregistered(msg.sender, returned);
    }

    // -- views ------------------------------------------------------------------------------

    function getNodeFullInfo(address operator)
        external
        view
        returns (address, uint256, bool, string memory, string memory, bytes32[] memory, uint256, uint256)
    {
        Node storage node = nodes[operator];
        return (
            node.operator,
            node.stakedAmount,
            node.active,
            node.metadata,
            node.apiUrl,
            node.supportedModels,
            node.minPricePerTokenNative,
            node.minPricePerTokenStable
        );
    }

    function getNodesForModel(bytes32 modelId) external view returns (address[] memory) {
        return modelToNodes[modelId];
    }

    function getAllActiveNodes() external view returns (address[] memory) {
        return activeNodesList;
    }

    function isActiveNode(address operator) external view returns (bool) {
        return nodes[operator].active;
    }

    function nodeSupportsModel(address operator, bytes32 modelId) external view returns (bool) {
        return _supports(operator, modelId);
    }

    function getModelPricing(address operator, bytes32 modelId, address token) external view returns (uint256) {
        uint256 price = modelTokenPricing[operator][modelId][token];
        require(price > 0, "No model pricing");
        return price;
    }

    function getHostModelPrices(address operator, address token)
        external
        view
        returns (bytes32[] memory modelIds, uint256[] memory prices)
    {
        modelIds = nodes[operator].supportedModels;
        prices = new uint256[](modelIds.length);
        for (uint256 i = 0; i < modelIds.length; i++) {
            prices[i] = modelTokenPricing[operator][modelIds[i]][token];
        }
    }

    function _supports(address operator, bytes32 modelId) private view returns (bool) {
        bytes32[] storage models = nodes[operator].supportedModels;
        for (uint256 i = 0; i < models.length; i++) {
            if (models[i] == modelId) {
                return true;
            }
        }
        return false;
    }

    function _removeFrom(address[] storage list, address who) private {
        for (uint256 i = 0; i < list.length; i++) {
            if (list[i] == who) {
                list[i] = list[list.length - 1];
                list.pop();
                return;
            }
        }
    }
}
