"""peft-dist: distributed parameter-efficient fine-tuning on a ZeRO-3 sharded 8-bit base."""
__version__ = "0.1.0"
