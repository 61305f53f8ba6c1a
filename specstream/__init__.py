"""Speculative Streaming: one model drafts and verifies its own future tokens in a single pass."""
