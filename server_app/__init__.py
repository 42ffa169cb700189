"""The ServerApp: strategy, server-side DP, checkpoints, metrics log."""
