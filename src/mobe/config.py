"""Typed, versioned settings of a compression run.

Each field's metadata documents it for the command line, which builds its options from these dataclasses
(cli/options.py): `help`, and where given `choices`, `metavar`, `flag` (the option's name when it is not the
field's, `--bases` for num_bases) and `aliases` (`-m`). This module imports no torch: the command line answers
`--help` without it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
# The factorisation methods (factorize/registry.py registers them; a test keeps the two equal): a list that needs no
# torch, for the command line's choices.
METHODS = ("d2moe", "mobe", "molae", "slbf", "svd")
ACTIVATIONS = ("tanh", "silu", "none")
SCHEDULES = ("fast", "adam", "paper")
BASIS_SIDES = ("wider", "hidden")
DEFAULT_STEPS = {"fast": 2000, "adam": 10000, "paper": 10000}
COMPRESSIBLE = ("gate", "up", "down")
DEFAULT_MATRICES = ("gate", "up", "down")
DEFAULT_RIDGE = 1e-6  # of the exact A solves: only keeps the Cholesky factor defined for rank-deficient M_i
FAST_INIT_LOGIT = 4.0  # own-basis softmax weight e^4 / (e^4 + m - 1): 0.64 at m = 32, against 0.08 at logit 1


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (a calibration text: what a resumed run must match)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class MobeConfig:
    """Settings of the MoBE factorisation W_i ~ A_i act(sum_j alpha_ij B_j), per layer and matrix type.

    The defaults are the recipe measured best on both trained fixtures (benchmarks/data_free.py, docs/results.md):
    gate, up and down compressed, m = E/4 bases on the wider side of each matrix, the `fast` schedule (variable
    projection with orthogonalised basis steps), the rank from `target_ratio`. The paper's own settings are
    `schedule="adam"` (or `"paper"`, its script's quirks included), `basis_side="hidden"`, `matrices=("gate", "up")`.
    """

    method: str = field(default="mobe", metadata={"help": "mobe | slbf | svd | d2moe | molae", "choices": METHODS})
    num_bases: int = field(
        default=0,
        metadata={
            "help": "m: shared bases per layer and matrix type; 0 = a quarter of the experts",
            "flag": "--bases",
            "aliases": ("-m",),
        },
    )
    rank: int | None = field(
        default=None,
        metadata={
            "help": "r: rank of A_i and B_j (slbf: k, the rank of each basis); None means min(p, d)",
            "aliases": ("-r",),
        },
    )
    activation: str | None = field(
        default=None,
        metadata={
            "help": "tanh | silu | none, on the mixed basis; None = the method's own (mobe tanh, slbf silu)",
            "choices": ACTIVATIONS,
        },
    )
    basis_side: str | None = field(
        default=None,
        metadata={
            "help": "mobe: hidden = bases along the hidden size (the paper); wider = along the wider of p and d "
            "(a p > d stack is fitted transposed; the same fit where p <= d); None = hidden for the paper "
            "schedule (the authors' script), else wider",
            "choices": BASIS_SIDES,
        },
    )
    groups: int = field(default=1, metadata={"help": "expert groups, each with num_bases/groups bases"})
    schedule: str = field(
        default="fast",
        metadata={
            "help": "fast: joint Adam, then exact least-squares A every step with orthogonalised basis steps; "
            "adam: the paper's Algorithm 1; paper: the authors' train.py with its quirks (fp16 targets, SVD of "
            "unscaled weights, best state one step late)",
            "choices": SCHEDULES,
        },
    )
    target_ratio: float | None = field(
        default=None, metadata={"help": "expert-parameter reduction to hit (0-1); sets the rank of any method"}
    )
    steps: int | None = field(
        default=None,
        metadata={"help": "full passes over the experts; None = the schedule's default (fast 2000, else 10000)"},
    )
    lr: float = field(default=0.07, metadata={"help": "Adam learning rate"})
    ridge: float = field(
        default=DEFAULT_RIDGE,
        metadata={
            "help": "fast: ridge of each exact A_i solve, relative to the mean diagonal of M_i M_i^T; 1e-3 gives "
            "factors that survive int4 rounding far better, at a small cost in error (docs/quantize.md)"
        },
    )
    eval_every: int = field(default=200, metadata={"help": "steps between checks of the best state"})
    stop_tol: float = field(
        default=1e-4,
        metadata={"help": "fast: stop when eval_every steps cut the best MSE by less than this fraction; 0 = never"},
    )
    batch_experts: int = field(
        default=0, metadata={"help": "experts per gradient-accumulation chunk; 0 = auto (~1 GiB)"}
    )
    init_logit: float | None = field(
        default=None,
        metadata={
            "help": "initial coefficient logit of each expert's own basis; None = the schedule's own (mobe fast "
            f"{FAST_INIT_LOGIT}: a sharper start, measured better on both fixtures; otherwise 1.0, the authors')"
        },
    )
    matrices: tuple[str, ...] = field(
        default=DEFAULT_MATRICES, metadata={"help": "matrix types to compress (down is fitted as its transpose)"}
    )
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "MoE layers to compress; None=all"})
    device: str = field(
        default="auto",
        metadata={"help": "cpu | cuda | cuda:N | auto (all visible GPUs) | a comma-separated list, one job per device"},
    )
    threads: int = field(
        default=0,
        metadata={"help": "CPU threads per job (0 = torch's default); fix it for bit-identical CPU runs anywhere"},
    )
    dtype: str = field(default="auto", metadata={"help": "dtype of the written factors; auto = the source's"})
    seed: int = field(default=0, metadata={"help": "random seed (CPU runs are deterministic for a seed)"})
    calibration: str | None = field(
        default=None,
        metadata={
            "help": "calibration text file: fit the output error on the tokens routed to each expert instead of "
            "the weight error (needs the checkpoint's tokenizer)",
            "metavar": "FILE",
        },
    )
    calibration_tokens: int = field(default=32768, metadata={"help": "calibration tokens used (the text's first N)"})
    calibration_seq_len: int = field(default=512, metadata={"help": "tokens per calibration sequence"})
    calibration_damping: float = field(
        default=0.01, metadata={"help": "damping of each expert's Gram, as a share of its mean diagonal"}
    )
    calibration_refine_steps: int = field(
        default=0,
        metadata={
            "help": "after the fit, Adam steps of layer-local distillation of each layer's whole routed-experts "
            "output on the calibration tokens (0 = off; stops early on a held-out tenth of them)"
        },
    )
    calibration_refine_lr: float = field(
        default=3e-3, metadata={"help": "learning rate of the refinement, relative to each factor's std"}
    )

    def __post_init__(self) -> None:
        self.matrices = tuple(self.matrices)
        if self.layers is not None:
            self.layers = tuple(int(layer) for layer in self.layers)
        if self.num_bases < 0:
            raise ValueError(f"num_bases must be >= 1 (or 0: a quarter of the experts), got {self.num_bases}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.target_ratio is not None and not 0 < self.target_ratio < 1:
            raise ValueError(f"target_ratio must be between 0 and 1, got {self.target_ratio}")
        if not self.method or not self.method.isidentifier():  # known names are checked where methods live
            raise ValueError(f"method must be a method name, got {self.method!r}")
        if self.basis_side is None:  # `--schedule paper` replays the authors' script, bases along the hidden size
            self.basis_side = "hidden" if self.schedule == "paper" else "wider"
        if self.basis_side not in BASIS_SIDES:
            raise ValueError(f"basis_side must be one of {BASIS_SIDES}, got {self.basis_side!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.groups < 1 or (self.num_bases and self.num_bases % self.groups):
            raise ValueError(f"groups ({self.groups}) must divide num_bases ({self.num_bases})")
        if self.steps is None:
            self.steps = DEFAULT_STEPS[self.schedule]
        if self.steps < 0 or self.eval_every < 1 or self.lr <= 0 or self.stop_tol < 0 or self.ridge < 0:
            raise ValueError(
                f"need steps >= 0, eval_every >= 1, lr > 0, stop_tol >= 0, ridge >= 0; got {self.steps}, "
                f"{self.eval_every}, {self.lr}, {self.stop_tol}, {self.ridge}"
            )
        bad = [m for m in self.matrices if m not in COMPRESSIBLE]
        if bad or not self.matrices:
            raise ValueError(f"matrices must be a non-empty subset of {COMPRESSIBLE}, got {self.matrices}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.calibration_refine_steps < 0 or self.calibration_refine_lr <= 0:
            raise ValueError(
                f"need calibration_refine_steps >= 0, calibration_refine_lr > 0; got {self.calibration_refine_steps}, "
                f"{self.calibration_refine_lr}"
            )
        if self.calibration_tokens < 2 or self.calibration_seq_len < 2 or self.calibration_damping < 0:
            raise ValueError(
                "need calibration_tokens >= 2, calibration_seq_len >= 2, calibration_damping >= 0; got "
                f"{self.calibration_tokens}, {self.calibration_seq_len}, {self.calibration_damping}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

    def bases_for(self, num_experts: int) -> int:
        """m for a layer of `num_experts`: num_bases, or when it is 0 a quarter of the experts (the paper's ratio for
        Qwen3 and DeepSeek-V3, and the best of E/8, E/4, E/2 measured on both trained fixtures), rounded down to a
        multiple of the expert groups, at least one per group."""
        if self.num_bases:
            return self.num_bases
        m = max(self.groups, num_experts // 4)
        return m - m % self.groups

    @property
    def start_logit(self) -> float:
        """The initial own-basis logit this run uses (init_logit, or the schedule's own when it is None)."""
        if self.init_logit is not None:
            return self.init_logit
        return FAST_INIT_LOGIT if self.schedule == "fast" and self.method == "mobe" else 1.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["matrices"] = list(self.matrices)
        out["layers"] = None if self.layers is None else list(self.layers)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MobeConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the factors: all but the device list; CPU threads are in, since they change
        the summation order and so the bits a resumed run would append to."""
        out = self.to_dict()
        out.pop("device")
        if self.calibration is not None:  # the text's content decides the factors, not where it lies
            out["calibration"] = "sha256:" + file_sha256(self.calibration)
        else:
            for key in [k for k in out if k.startswith("calibration")]:
                out.pop(key)
        return out


QUANTIZE_BITS = (2, 3, 4, 8)
QUANTIZE_OBSERVERS = ("minmax", "mse")  # as quantize.groupwise.OBSERVERS (the maths does not import config)
QUANTIZE_SCOPES = ("experts", "linears")
JOINT_METHODS = ("mobe", "slbf")  # A_i times a mixed basis: rounded in its orthonormal coordinates below 8 bits
FACTOR_ROUNDINGS = ("weights", "sampled", "nearest")  # data-free rounding of MoBE factors below 8 bits (quantize.proxy)


@dataclass
class QuantizeConfig:
    """Weight-only, symmetric, group-wise integer quantisation of a checkpoint (after any compression, or alone).

    Dense checkpoints are written in compressed-tensors' format (what llm-compressor writes for W4A16 / W8A16:
    pack-quantized); native MoBE checkpoints keep their factors, stored as integers plus scales. Without
    `calibration` every weight is rounded to nearest; with it, a dense checkpoint's routed experts are rounded by
    GPTQ on the Hessians of the tokens routed to each expert (`mobe.quantize.gptq`).
    """

    bits: int = field(default=4, metadata={"help": "bits per quantised weight", "choices": QUANTIZE_BITS})
    group_size: int = field(default=128, metadata={"help": "consecutive input-dimension weights sharing one scale"})
    scope: str = field(
        default="experts",
        metadata={
            "help": "dense checkpoints: experts (the routed experts' linears) | linears (every linear layer but "
            "lm_head, the routers and the shared-expert gates); native ones always quantise their factors",
            "choices": QUANTIZE_SCOPES,
        },
    )
    calibration: str | None = field(
        default=None,
        metadata={
            "help": "calibration text file: round a dense checkpoint's routed experts by GPTQ on the inputs routed "
            "to each expert (scope experts; needs the checkpoint's tokenizer) instead of to nearest",
            "metavar": "FILE",
        },
    )
    calibration_tokens: int = field(default=32768, metadata={"help": "calibration tokens used (the text's first N)"})
    calibration_seq_len: int = field(default=512, metadata={"help": "tokens per calibration sequence"})
    damping: float = field(
        default=0.01, metadata={"help": "GPTQ: damping added to each Hessian's diagonal, as a share of its mean"}
    )
    act_order: bool = field(
        default=True,
        metadata={
            "help": "GPTQ: round each matrix's columns by decreasing Hessian diagonal (llm-compressor's static "
            "act-order, its default); scales stay per group, so storage is unchanged"
        },
    )
    observer: str = field(
        default="minmax",
        metadata={
            "help": "GPTQ: how each group's scale is fixed before rounding: minmax (its largest weight at the end of "
            "the range; llm-compressor's default) | mse (the shrink of that scale with the least rounding error; "
            "same storage)",
            "choices": QUANTIZE_OBSERVERS,
        },
    )
    sequential: bool = field(
        default=False,
        metadata={
            "help": "GPTQ: run each layer again with its rounded experts, so later layers are calibrated on the "
            "quantised model's hidden states (llm-compressor's default); off: on the original's"
        },
    )

    shared_bits: int = field(
        default=8,
        metadata={
            "help": "bits of the factors a whole layer shares (MoBE's bases) when the expert factors take fewer than "
            "8; 16 keeps them in floating point",
            "choices": (8, 16),
        },
    )
    factor_rounding: str = field(
        default="weights",
        metadata={
            "help": "native MoBE factors below 8 bits without calibration: weights (GPTQ on the second moments the "
            "weights stand in for: gate/up the experts' input-side Gram, down their intermediate activations on "
            "Gaussian inputs shaped by it; each group's scale the clip with the least rounding error) | sampled "
            "(compress only: GPTQ on the routed inputs of --calibration-tokens tokens the original model samples "
            "itself, A first re-solved against the original experts on them; holds the whole model while it "
            "samples) | nearest (round to nearest, min-max scales); same storage",
            "choices": FACTOR_ROUNDINGS,
        },
    )

    def __post_init__(self) -> None:
        if self.bits not in QUANTIZE_BITS:
            raise ValueError(f"quantize bits must be one of {QUANTIZE_BITS}, got {self.bits}")
        if self.shared_bits not in (8, 16):
            raise ValueError(f"quantize shared_bits must be 8 or 16, got {self.shared_bits}")
        if self.group_size < 1:
            raise ValueError(f"quantize group_size must be >= 1, got {self.group_size}")
        if self.observer not in QUANTIZE_OBSERVERS:
            raise ValueError(f"quantize observer must be one of {QUANTIZE_OBSERVERS}, got {self.observer!r}")
        if self.factor_rounding not in FACTOR_ROUNDINGS:
            raise ValueError(
                f"quantize factor_rounding must be one of {FACTOR_ROUNDINGS}, got {self.factor_rounding!r}"
            )
        if self.scope not in QUANTIZE_SCOPES:
            raise ValueError(f"quantize scope must be one of {QUANTIZE_SCOPES}, got {self.scope!r}")
        if self.calibration_tokens < 2 or self.calibration_seq_len < 2 or self.damping < 0:
            raise ValueError(
                "need calibration_tokens >= 2, calibration_seq_len >= 2, damping >= 0; got "
                f"{self.calibration_tokens}, {self.calibration_seq_len}, {self.damping}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DISTILL_MODES = ("router", "router+coef", "all-small")
DISTILL_SCHEDULES = ("cosine", "halve")


@dataclass
class DistillConfig:
    """Settings of knowledge distillation of a compressed model toward its original, on a text.

    Only small tensors train; everything else stays frozen. The last `heldout_fraction` of the text's sequences
    chooses the best state, and the input is kept when nothing beats it there.
    """

    train: str = field(
        default="router",
        metadata={
            "help": "router: the routers' weights; router+coef: plus each expert's basis coefficients; "
            "all-small: plus each expert's own factor A_i (shared bases stay frozen)",
            "choices": DISTILL_MODES,
        },
    )
    epochs: int = field(default=3, metadata={"help": "passes over the training part of the text"})
    lr: float = field(default=1e-2, metadata={"help": "AdamW peak learning rate of the routers and coefficients"})
    a_lr_scale: float = field(
        default=0.1, metadata={"help": "all-small: the A_i (most of the trained entries) learn at lr times this"}
    )
    batch: int = field(default=4, metadata={"help": "sequences per optimiser step"})
    top_k: int = field(default=64, metadata={"help": "teacher log-probabilities kept per token (plus their tail)"})
    tokens: int = field(default=65536, metadata={"help": "tokens of the text used (its first N)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "share of the sequences held out, from the end"})
    eval_every: int = field(default=4, metadata={"help": "optimiser steps between held-out checks"})
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "cosine: linear warmup then cosine decay of the learning rate; halve: constant, halved (from the "
            "best state) at each held-out check that does not improve",
            "choices": DISTILL_SCHEDULES,
        },
    )
    warmup: float = field(default=0.05, metadata={"help": "cosine: share of the steps spent warming up"})
    router_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the routing loss: KL of each MoE layer's routing to the original's; 0 = off"},
    )
    router_top_k: int = field(
        default=32, metadata={"help": "the original's router log-probabilities kept per token and layer (plus tail)"}
    )
    device: str = field(default="auto", metadata={"help": "cpu | cuda | cuda:N | mps | auto"})
    seed: int = field(default=0, metadata={"help": "seed of the order of the training sequences"})

    def __post_init__(self) -> None:
        if self.train not in DISTILL_MODES:
            raise ValueError(f"distill train must be one of {DISTILL_MODES}, got {self.train!r}")
        if self.schedule not in DISTILL_SCHEDULES:
            raise ValueError(f"distill schedule must be one of {DISTILL_SCHEDULES}, got {self.schedule!r}")
        if self.router_weight < 0 or self.router_top_k < 1 or not 0 <= self.warmup < 1:
            raise ValueError(
                "need distill router_weight >= 0, router_top_k >= 1, 0 <= warmup < 1; got "
                f"{self.router_weight}, {self.router_top_k}, {self.warmup}"
            )
        positive = {"lr": self.lr, "a_lr_scale": self.a_lr_scale, "batch": self.batch, "top_k": self.top_k}
        positive["eval_every"] = self.eval_every
        bad = [f"{k}={v}" for k, v in positive.items() if v <= 0]
        bad += [f"epochs={self.epochs}"] if self.epochs < 0 else []
        if bad:
            raise ValueError(f"distill settings out of range: {', '.join(bad)} (epochs >= 0, the others > 0)")
        if self.tokens < 2 * self.seq_len or self.seq_len < 2 or not 0 < self.heldout_fraction < 1:
            raise ValueError(
                "need distill tokens >= 2 * seq_len, seq_len >= 2, 0 < heldout_fraction < 1; got "
                f"{self.tokens}, {self.seq_len}, {self.heldout_fraction}"
            )

    @property
    def routing_top_k(self) -> int:
        """The original's router log-probabilities recorded per token and MoE layer: none without the routing loss."""
        return self.router_top_k if self.router_weight > 0 else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rounds_on_sampled_text(config: MobeConfig, quantize: QuantizeConfig | None, reconstruct: bool) -> bool:
    """Whether a compression rounds its integer MoBE factors on text the original samples itself
    (`factor_rounding` "sampled"): native MoBE output below 8 bits, no calibration text."""
    return (
        quantize is not None
        and quantize.factor_rounding == "sampled"
        and quantize.bits < 8
        and not reconstruct
        and config.method in JOINT_METHODS
        and config.calibration is None
    )
