"""Process topology, the control channel, the peer serve loop, rank 0's backend and the benchmark."""
