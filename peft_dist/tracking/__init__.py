"""Experiment tracking behind a small protocol; only rank 0 ever talks to a tracking backend."""
from peft_dist.tracking.base import NullTracker, Tracker, create_tracker

__all__ = ["NullTracker", "Tracker", "create_tracker"]
