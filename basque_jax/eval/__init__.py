"""Evaluation: held-out perplexity and multiple-choice accuracy by log-likelihood."""
