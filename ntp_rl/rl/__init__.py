"""GRPO's pieces, used by `ntp_rl/stages/rl.py`.

    advantages.py    group-relative advantage estimators, a registry keyed by name
    policy_loss.py   clipped surrogate losses (registry), loss aggregation, the k3 KL
    rollout.py       prompt stream, seeded rollouts, dynamic sampling, batches and log-probs
"""
