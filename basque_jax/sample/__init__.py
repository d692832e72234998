"""Sampling: the KV-cache sampler, Magpie instruction generation, translation, filters."""

from basque_jax.sample.sampler import Completion, PromptTooLong, Request, Sampler
from basque_jax.sample.sampling import SamplingParams

__all__ = ["Completion", "PromptTooLong", "Request", "Sampler", "SamplingParams"]
