"""Data: conversation records (SPEC §2), source loaders (OASST, HH-RLHF), templates and loss masks (SPEC §3-§4)."""
