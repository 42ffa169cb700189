"""Membership inference against a published personalized prompt (the DP-FPL paper's threat model).

``data``: which records are members, non-members and shadow data; ``train``: prompts trained by the
engine on a given record set (the target and the shadows); ``mia``: the two attacks (Shokri et al.'s
shadow-model attack, Yeom et al.'s loss threshold) and their metrics; ``experiment``: the grid over
methods and epsilons with its table and plot.
"""

from .mia import AttackMetrics, attack_metrics, loss_threshold_attack, record_signals, shadow_model_attack

__all__ = ["AttackMetrics", "attack_metrics", "loss_threshold_attack", "record_signals", "shadow_model_attack"]
