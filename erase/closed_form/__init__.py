"""Closed-form cross-attention edits: uce, time, rece."""
