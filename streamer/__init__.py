"""Streaming real-time predictor: Kafka events in, per-key LSTM state, predictions out."""

__version__ = "0.1.0"
