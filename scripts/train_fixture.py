"""Train one of the project's small MoE fixtures on a documentation corpus shipped by a Debian package.

Random weights have no structure to compress; these models have learned, so compression errors measured on them
mean something. Everything is deterministic given --seed: the document split (by a hash of each file's path), the
tokenizer, the initialisation and the batch order.

The coarse fixture (p > d: 16 experts of p=256 on d=128, top-2), on the Python 3.11 documentation:

    apt-get install -y python3.11-doc
    python scripts/train_fixture.py --out fixtures/qwen3-moe-trained --steps 2000

The fine-grained fixture (p < d, the shape of today's MoEs: 64 experts of p=64 on d=256, top-8, one shared
expert, a dense first layer), on the Perl documentation:

    apt-get install -y perl-doc
    python scripts/train_fixture.py --fine-grained --out fixtures/qwen2-moe-fine-trained

Writes the model (bfloat16, sharded), its tokenizer, `heldout.txt` (held-out documents, never trained on) and
`training_stats.json` (loss curve summary, held-out perplexity, per-layer distance of the experts from init).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

DEFAULT_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PERL_SOURCES = Path("/usr/share/perl")

# --fine-grained: every default below replaced by these (an explicit flag still wins).
FINE_GRAINED = {
    "arch": "qwen2_moe",
    "sources": PERL_SOURCES,
    "pattern": "*.pod",
    "package": "perl-doc",
    "hidden_size": 256,
    "layers": 6,
    "dense_layers": 1,
    "experts": 64,
    "moe_intermediate_size": 64,
    "shared_expert_size": 128,
    "top_k": 8,
    "aux_loss_coef": 0.02,
    "steps": 1500,
    "tie_embeddings": True,
    "prompt": "The hash function",
}
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fine-grained", action="store_true", help="the p < d fixture's settings (see the docstring)")
    p.add_argument("--arch", choices=("qwen3_moe", "qwen2_moe"), default="qwen3_moe")
    p.add_argument("--sources", type=Path, default=DEFAULT_SOURCES, help="folder of documents (python3.11-doc)")
    p.add_argument("--pattern", default="*.rst.txt", help="glob of the documents under --sources")
    p.add_argument("--package", default="python3.11-doc", help="Debian package that ships --sources")
    p.add_argument("--dense-layers", type=int, default=0, help="first layers with a dense MLP instead of experts")
    p.add_argument("--shared-expert-size", type=int, default=0, help="qwen2_moe: shared expert width (0: none)")
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--prompt", default="The list type", help="prompt of the sample generation in the stats")
    p.add_argument("--out", type=Path, default=Path("fixtures/qwen3-moe-trained"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-percent", type=int, default=5, help="share of documents held out, by path hash")
    p.add_argument("--heldout-max-bytes", type=int, default=200_000, help="cap on heldout.txt")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--moe-intermediate-size", type=int, default=256)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--init-std", type=float, default=0.02, help="initializer_range of the config")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="router load-balancing loss coefficient")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-shard-size", default="5MB")
    args = p.parse_args(argv)
    if args.fine_grained:
        given = {a.split("=")[0][2:].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in FINE_GRAINED.items():
            if key not in given:
                setattr(args, key, value)
    return args


def split_documents(
    sources: Path, heldout_percent: int, pattern: str = "*.rst.txt", package: str = "python3.11-doc"
) -> tuple[list[Path], list[Path]]:
    """(train, heldout) document lists; a document is held out when its path hash falls below `heldout_percent`."""
    files = sorted(sources.rglob(pattern))
    if not files:
        raise SystemExit(f"no {pattern} files under {sources}: install {package} (apt-get install {package})")
    train, heldout = [], []
    for f in files:
        h = int(hashlib.sha256(str(f.relative_to(sources)).encode()).hexdigest(), 16) % 100
        (heldout if h < heldout_percent else train).append(f)
    return train, heldout


def read_texts(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def heldout_text(texts: list[str], max_bytes: int) -> str:
    """Held-out documents joined by blank lines, cut at a line boundary to at most `max_bytes` UTF-8 bytes."""
    out, size = [], 0
    for line in "\n\n".join(texts).splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes:
            break
        out.append(line)
        size += n
    return "".join(out)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a PreTrainedTokenizerFast with bos = eos = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def build_model(args: argparse.Namespace, tokenizer):
    from transformers import (
        GenerationConfig,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    d = args.hidden_size
    config_class, model_class = {
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
        "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
    }[args.arch]
    extra = {}
    if args.arch == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = args.shared_expert_size
    if args.dense_layers:
        extra["mlp_only_layers"] = list(range(args.dense_layers))
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=d // 4,
        max_position_embeddings=2 * args.seq_len,
        moe_intermediate_size=args.moe_intermediate_size,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_loss_coef,
        initializer_range=args.init_std,
        tie_word_embeddings=args.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def expert_weights(model) -> dict[str, torch.Tensor]:
    """Per layer, the fused expert matrices (gate_up_proj: E x 2p x d, down_proj: E x d x p), float32 copies."""
    return {
        name: p.detach().float().clone()
        for name, p in model.named_parameters()
        if ".mlp.experts." in name and name.endswith(("gate_up_proj", "down_proj"))
    }


def distances_from_init(model, init: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """||W - W0||_F / ||W0||_F per layer for gate, up and down (all experts of the layer together)."""
    now = expert_weights(model)
    out: dict[str, dict[str, float]] = {}
    for name, w0 in init.items():
        layer = name.split(".layers.")[1].split(".")[0]
        w = now[name]
        if name.endswith("gate_up_proj"):
            p = w0.shape[1] // 2
            parts = {"gate": (w[:, :p], w0[:, :p]), "up": (w[:, p:], w0[:, p:])}
        else:
            parts = {"down": (w, w0)}
        for kind, (a, b) in parts.items():
            out.setdefault(layer, {})[kind] = ((a - b).norm() / b.norm()).item()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from mobe.evaluate.perplexity import sliding_window_perplexity

    t_start = time.time()
    train_files, heldout_files = split_documents(args.sources, args.heldout_percent, args.pattern, args.package)
    train_texts = read_texts(train_files)
    heldout = heldout_text(read_texts(heldout_files), args.heldout_max_bytes)
    print(f"{len(train_files)} training documents, {len(heldout_files)} held out ({len(heldout)} chars kept)")

    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    ids: list[int] = []
    for text in train_texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    data = torch.tensor(ids, dtype=torch.long)
    n_seq = data.numel() // args.seq_len
    data = data[: n_seq * args.seq_len].view(n_seq, args.seq_len)
    heldout_ids = torch.tensor(tokenizer(heldout)["input_ids"], dtype=torch.long)
    print(f"tokenizer: {len(tokenizer)} tokens; train {data.numel()} tokens, held-out {heldout_ids.numel()} tokens")

    model = build_model(args, tokenizer)
    init = expert_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(n_seq, generator=gen)
    cursor = 0
    lm_losses: list[float] = []
    aux_losses: list[float] = []
    model.train()
    t_train = time.time()
    bar = tqdm(range(args.steps), desc="Training")
    for step in bar:
        if cursor + args.batch_size > n_seq:
            order, cursor = torch.randperm(n_seq, generator=gen), 0
        batch = data[order[cursor : cursor + args.batch_size]]
        cursor += args.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = out.aux_loss.item()
        lm_losses.append(out.loss.item() - args.aux_loss_coef * aux)
        aux_losses.append(aux)
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{sum(lm_losses[-20:]) / len(lm_losses[-20:]):.3f}", aux=f"{aux:.3f}")
    train_seconds = time.time() - t_train

    model.eval()
    distances = distances_from_init(model, init)
    model = model.to(torch.bfloat16)
    ppl = sliding_window_perplexity(model, heldout_ids, context=args.seq_len, stride=args.seq_len // 2)
    print(f"held-out perplexity (bfloat16): {ppl.perplexity:.2f} over {ppl.tokens} tokens")
    usage = expert_usage(model, heldout_ids[: 8 * args.seq_len].view(8, args.seq_len))
    prompt = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        sample = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    sample_text = tokenizer.decode(sample[0], skip_special_tokens=True)
    print("sample:", sample_text)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(args.out)
    (args.out / "heldout.txt").write_text(heldout, encoding="utf-8")

    def window_mean(xs: list[float], a: int, b: int) -> float:
        xs = xs[a:b]
        return sum(xs) / len(xs)

    curve_points = sorted({0, *range(0, args.steps, max(1, args.steps // 20)), args.steps - 1})
    stats = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "seed": args.seed,
        "source": str(args.sources),
        "documents": {"train": len(train_files), "heldout": len(heldout_files)},
        "package": args.package,
        "config": {k: v for k, v in vars(args).items() if k not in {"sources", "out"}},
        "parameters": n_params,
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_tokens": data.numel(),
        "epochs": args.steps * args.batch_size / n_seq,
        "train_wall_seconds": round(train_seconds, 1),
        "total_wall_seconds": round(time.time() - t_start, 1),
        "train_loss": {
            "first_50_mean": window_mean(lm_losses, 0, 50),
            "last_100_mean": window_mean(lm_losses, -100, None),
            "curve": {str(s): window_mean(lm_losses, max(0, s - 10), s + 10) for s in curve_points},
            "aux_loss_last_100_mean": window_mean(aux_losses, -100, None),
        },
        "heldout": {"bytes": len(heldout.encode("utf-8")), **ppl.to_dict()},
        "uniform_perplexity": len(tokenizer),
        "expert_distance_from_init": distances,
        "expert_usage_heldout": usage,
        "sample_generation": sample_text,
    }
    (args.out / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps({k: stats[k] for k in ("train_wall_seconds", "expert_distance_from_init")}, indent=1))


@torch.no_grad()
def expert_usage(model, batch: torch.Tensor) -> dict[str, list[float]]:
    """Per layer, the share of routed (token, slot) pairs each expert receives on `batch`."""
    out = model(input_ids=batch, output_router_logits=True)
    k = model.config.num_experts_per_tok
    usage = {}
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    for i, logits in zip(moe_layers, out.router_logits, strict=True):
        top = logits.float().topk(k, dim=-1).indices.flatten()
        counts = torch.bincount(top, minlength=model.config.num_experts).float()
        usage[str(i)] = [round(c, 4) for c in (counts / counts.sum()).tolist()]
    return usage


if __name__ == "__main__":
    main()
