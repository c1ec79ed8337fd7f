"""PyTorch reference implementations used as independent test oracles."""
