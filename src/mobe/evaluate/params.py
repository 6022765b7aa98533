"""Closed-form parameter counts."""


def mobe_parameters(num_experts: int, p: int, d: int, num_bases: int, rank: int, groups: int = 1) -> int:
    """Parameters of one MoBE-compressed matrix type: E*p*r + m*r*d + E*m/g (each expert mixes its group's bases)."""
    return num_experts * p * rank + num_bases * rank * d + num_experts * (num_bases // groups)
