"""The ClientApp: local training, local DP, node-local state on disk."""
