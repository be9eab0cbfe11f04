"""steerlm: steerable language models (SteerLM) with an InstructGPT RLHF baseline."""

__version__ = "0.1.0"
