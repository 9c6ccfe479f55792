"""Verifiable rewards behind one interface (`verifiers`: the offline tasks, GSM8K, MATH, code) and
the sandbox that runs untrusted code (`sandbox`). REFERENCE §6 (rewards).

Its own layer, between the model/data layer and the loops: RL scores rollouts with it and
evaluation scores benchmarks with it, so neither owns it. May import `data`; nothing that
touches a model.
"""

from llada_jax.rewards.verifiers import (REWARDS, RewardError, RewardFn, by_task, code_check, code_reward,
                                         code_reward_with, extract_boxed, extract_code, final_number, get_reward,
                                         gsm8k_reward, judge, load_reward, math_equal, math_reward, normalise_math,
                                         parse_number, reward_fn, score, Scorer)

__all__ = [
    "REWARDS", "RewardError", "RewardFn", "by_task", "code_check", "code_reward", "code_reward_with",
    "extract_boxed", "extract_code", "final_number", "get_reward", "gsm8k_reward", "judge", "load_reward",
    "math_equal", "math_reward", "normalise_math", "parse_number", "reward_fn", "score", "Scorer",
]
