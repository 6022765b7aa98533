"""`mobe --help`, `mobe --version`, `mobe COMMAND --help` and `import mobe` answer without torch or transformers; the
native model types still open in transformers' Auto classes once mobe is imported, whichever is imported first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mobe
from mobe import MobeConfig, compress
from mobe._native_types import PREFIX
from mobe.architectures import NATIVE_MODEL_TYPE_PREFIX
from mobe.cli.main import build_parser

SRC = str(Path(mobe.__file__).resolve().parents[1])  # this checkout's package, in the child processes too


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def commands() -> list[str]:
    (sub,) = [a for a in build_parser()._actions if a.choices and "compress" in a.choices]
    return list(sub.choices)


def test_help_version_and_import_mobe_load_neither_torch_nor_transformers():
    code = (
        "import json, sys\n"
        "import mobe\n"
        "from mobe.cli.main import main\n"
        f"for argv in [['--help'], ['--version'], *[[c, '--help'] for c in {commands()!r}]]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (argv, exit.code)\n"
        "mobe.MobeConfig(), mobe.QuantizeConfig(), mobe.DistillConfig(), mobe.__version__\n"
        "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))\n"
    )
    run = run_python(code)
    assert run.returncode == 0, run.stderr
    assert f"mobe {mobe.__version__}\n" in run.stdout
    assert json.loads(run.stdout.splitlines()[-1]) == []


def test_version_prints_the_package_version():
    env = {**os.environ, "PYTHONPATH": SRC}
    run = subprocess.run([sys.executable, "-m", "mobe", "--version"], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout == f"mobe {mobe.__version__}\n"
    pyproject = (Path(SRC).parent / "pyproject.toml").read_text()
    assert 'attr = "mobe.__version__"' in pyproject  # the one place the version is written


def test_public_names_resolve_lazily_to_their_modules():
    assert sorted(mobe.__all__) == mobe.__all__ and set(mobe.__all__) <= set(dir(mobe))
    for name in mobe.__all__:
        assert getattr(mobe, name).__name__ == name
    assert mobe.pipeline.compress is mobe.compress  # a submodule, by attribute
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        mobe.nonexistent  # noqa: B018
    assert PREFIX == NATIVE_MODEL_TYPE_PREFIX


@pytest.fixture(scope="module")
def native(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("startup") / "native"
    compress(tiny_checkpoints["qwen3_moe"], out, MobeConfig(num_bases=2, steps=2, device="cpu"), progress=False)
    return out


@pytest.mark.parametrize("first", ["mobe", "transformers"])
def test_native_checkpoint_opens_after_import_mobe_whichever_comes_first(native, first):
    """`import mobe` before transformers' Auto classes are imported (the import hook), or after (patched at once)."""
    imports = ["import mobe", "from transformers import AutoModelForCausalLM"]
    code = "\n".join(
        [
            *(imports if first == "mobe" else imports[::-1]),
            "import sys",
            "assert 'mobe.runtime' not in sys.modules",  # nothing registered yet
            f"model = AutoModelForCausalLM.from_pretrained({str(native)!r})",
            "from mobe.runtime import MobeExperts",
            "assert any(isinstance(m, MobeExperts) for m in model.modules())",
            "print(type(model).__name__)",
        ]
    )
    run = run_python(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["MobeQwen3MoeForCausalLM"]
