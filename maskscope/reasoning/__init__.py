"""Reasoning experiments' machinery: KV reuse across truncation points, cached jobs, CoT text surgery and
metrics."""
