"""Training recipes: datasets, small vision models with pluggable linear layers, the training loop."""
