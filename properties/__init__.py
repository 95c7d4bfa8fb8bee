"""Properties every correct GPT-2 attention satisfies, and the Hypothesis strategies that drive them."""
