"""Fine-tuning CCA models: mesh and sharding rules, data, optimiser, checkpoints, the loop."""
