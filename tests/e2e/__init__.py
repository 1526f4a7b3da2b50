"""End to end through `generate`: greedy parity, sampling distributions, trees, the API and its inputs."""
