"""Candidate rewrites of GPT-2 attention, and the machinery that gives each a verdict."""
