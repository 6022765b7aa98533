"""Benchmark accuracy through lm-eval's Python API, for any checkpoint mobe opens (native MoBE ones included).

lm-eval opens models by name in a fresh process, where the native model types are unknown; we hand it the model
mobe loaded instead (`HFLM(pretrained=model, tokenizer=tokenizer)`), so the factored experts run as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

YAML_SUFFIXES = (".yaml", ".yml")


class EvalError(ValueError):
    """A task that cannot be found or read, or lm-eval missing."""


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise EvalError("mobe eval needs lm-eval: pip install 'mobe[eval]'") from None
    return lm_eval


def task_spec(spec: str) -> str | dict[str, Any]:
    """A task name as it is; a YAML file as its config, `dataset_kwargs.data_files` made relative to the file.

    lm-eval hands `data_files` to `datasets.load_dataset`, which reads relative paths from the working directory;
    a task shipped with its data is meant to be read from beside its YAML.
    """
    if not spec.endswith(YAML_SUFFIXES):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise EvalError(f"task file {path} does not exist")
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as exc:  # YAML syntax, a missing include or !function
        raise EvalError(f"task file {path} cannot be read: {exc}") from None
    if "task" not in config:
        raise EvalError(f"task file {path} has no 'task' key (a task config is expected)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:

        def local(name: str) -> str:
            return name if "://" in name or Path(name).is_absolute() else str((path.parent / name).resolve())

        if isinstance(files, str):
            files = local(files)
        elif isinstance(files, list):
            files = [local(f) for f in files]
        else:
            files = {split: [local(f) for f in v] if isinstance(v, list) else local(v) for split, v in files.items()}
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": files}
    return config


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on an instantiated transformers model.

    Args:
        model: a causal LM (from `mobe.load_model` or `AutoModelForCausalLM` after `import mobe`), already on its
            device and in its dtype.
        tokenizer: its tokenizer.
        tasks: lm-eval task names, or paths to task YAML files.
        limit: examples per task (a fraction of the task when below 1).
        log_samples: keep every example's requests and responses (`results["samples"]`).

    Returns:
        lm-eval's results dictionary (`results`, `configs`, `n-samples`, ...).

    Example:
        >>> out = evaluate_tasks(mobe.load_model("./q3-mobe"), tok, ["hellaswag"], limit=100)  # doctest: +SKIP
        >>> out["results"]["hellaswag"]["acc_norm,none"]  # doctest: +SKIP
    """
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise EvalError("--tasks: no task given")
    specs = [task_spec(t) for t in tasks]
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=log_samples,
            task_manager=TaskManager(),
        )
    except KeyError as exc:  # lm-eval's way of saying a task name is unknown
        raise EvalError(f"--tasks: {exc.args[0] if exc.args else exc}") from None


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own Markdown table of the metrics (and of the groups, when tasks form groups)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def results_json(results: dict[str, Any], **extra: Any) -> str:
    """The metrics and the settings that produced them (task configs included; per-example samples left out)."""
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
    data = {**extra, **{k: results[k] for k in keep if k in results}}
    return json.dumps(data, indent=2, default=str) + "\n"
