"""Reasoning experiments' machinery: forced answers for task problems, CoT text surgery and metrics (the KV
reuse across truncation points is the engine's: maskscope.models.hf)."""
