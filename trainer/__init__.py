"""Offline and scheduled training that publishes model versions the streamer hot-swaps."""
