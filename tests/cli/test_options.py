"""The options generated from the config dataclasses: every field an option, the dataclass's defaults when none is
given, the historical names and aliases, and a method list that needs no torch equal to factorize's registry."""

import argparse
import dataclasses

import pytest

from mobe.cli.main import _distill_config, _mobe_config, _quantize_config, build_parser
from mobe.cli.options import add_config_options, config_from_args
from mobe.config import METHODS, DistillConfig, MobeConfig, QuantizeConfig
from mobe.factorize import method_names

CONFIGS = [MobeConfig, QuantizeConfig, DistillConfig]


@pytest.mark.parametrize("cls", CONFIGS)
def test_no_options_given_is_the_dataclass_defaults(cls):
    parser = argparse.ArgumentParser()
    add_config_options(parser, cls)
    assert config_from_args(cls, parser.parse_args([])) == cls()
    assert len(parser._actions) == 1 + len(dataclasses.fields(cls))  # --help, then one per field


def test_every_command_s_defaults_are_the_dataclass_defaults():
    parse = build_parser().parse_args
    args = parse(["compress", "m", "-o", "out", "--quantize", "int4"])
    assert _mobe_config(args) == MobeConfig()
    assert _distill_config(args, "distill-") == DistillConfig()
    assert _quantize_config(args) == QuantizeConfig()
    assert _quantize_config(parse(["compress", "m", "-o", "out"])) is None
    assert config_from_args(QuantizeConfig, parse(["quantize", "m", "-o", "out"])) == QuantizeConfig()
    distill = parse(["distill", "a", "b", "-o", "out", "--text", "t.txt"])
    assert _distill_config(distill, device=distill.device) == DistillConfig()


def test_names_aliases_and_list_types():
    parse = build_parser().parse_args
    args = parse(["compress", "m", "-o", "out", "-m", "8", "-r", "4", "--layers", "1,3-4", "--matrices", "gate,up"])
    config = _mobe_config(args)
    assert (config.num_bases, config.rank, config.layers, config.matrices) == (8, 4, (1, 3, 4), ("gate", "up"))
    distill = ["--distill-lr", "0.5", "--distill-train", "all-small"]
    quantize = ["--quantize", "int8", "--quantize-group-size", "32"]
    args = parse(["compress", "m", "-o", "out", "--bases", "6", "--method", "reap", *distill, *quantize])
    assert args.num_bases == 6 and args.method == "reap"
    assert _distill_config(args, "distill-") == DistillConfig(lr=0.5, train="all-small")
    assert _quantize_config(args) == QuantizeConfig(bits=8, group_size=32)
    args = parse(["quantize", "m", "-o", "out", "--bits", "8", "--group-size", "64", "--scope", "linears"])
    assert config_from_args(QuantizeConfig, args) == QuantizeConfig(bits=8, group_size=64, scope="linears")


@pytest.mark.parametrize("argv", [["--method", "nope"], ["--schedule", "slow"], ["--bits", "5"], ["--bases", "x"]])
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    command = ["quantize", "m", "-o", "out"] if argv[0] == "--bits" else ["compress", "m", "-o", "out"]
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([*command, *argv])
    assert exit.value.code == 2 and argv[0] in capsys.readouterr().err


def test_the_method_list_without_torch_is_factorize_s_registry():
    assert list(METHODS) == method_names()
