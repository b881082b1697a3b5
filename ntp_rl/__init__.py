"""ntp-rl: how the next-token objective used in pre-training shapes what RL can achieve."""

__version__ = "0.1.0"
