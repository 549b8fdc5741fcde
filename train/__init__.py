"""Training and evaluation of the node's models (datasets, losses, cross-validation, reports)."""
