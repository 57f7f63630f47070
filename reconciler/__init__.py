"""The brain: desired and actual state, reconciles, pull loops, the table, the command line."""
