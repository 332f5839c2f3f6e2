"""aha's RL core: config, the training step, the algorithm family. Importing `rl` is cheap;
torch and transformers are imported by the modules that need them."""
