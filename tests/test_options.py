"""Every option declares its role where it is defined; what --resume, -e and --init-from take
from a checkpoint, and what a record holds, are derived from the roles."""
import argparse
import glob
import importlib
import os

import pytest

import main_voc2007
import options
from conftest import ROOT

# Every entry script there is, found by its name: a new one is checked with no edit here.
SCRIPTS = [importlib.import_module(os.path.basename(path)[:-3])
           for path in sorted(glob.glob(os.path.join(ROOT, "main_*.py")))]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.__name__)
def test_every_option_of_every_entry_script_has_a_role(script):
    parser = script.get_args_parser()
    assert options.options_without_role(parser) == []
    assert set(options.OPTION_ROLES.values()) <= set(options.ROLES)


def test_an_option_added_without_a_role_is_found():
    parser = main_voc2007.get_args_parser()
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    assert options.options_without_role(parser) == ["label_smoothing"]
    with pytest.raises(ValueError, match="unknown role"):
        options.add_option(parser, "--other", role="misc")


def stored_settings(parser):
    """A checkpoint's settings with a value for every option that no command line gives."""
    return {action.dest: f"stored-{action.dest}" for action in parser._actions if action.dest != "help"}


@pytest.mark.parametrize("kind,flags", [
    ("resume", ["--resume", "ck.pth"]),
    ("evaluate", ["-e", "--resume", "ck.pth"]),
    ("init_from", ["--init-from", "ck.pth"]),
])
def test_what_a_checkpoint_gives_is_the_options_of_the_roles_taken(kind, flags):
    parser = main_voc2007.get_args_parser()
    args = options.parse_args(parser, ["data", *flags])
    stored = stored_settings(parser)
    options.take_from_checkpoint(args, stored, "ck.pth")
    taken = {key for key, value in vars(args).items() if value == f"stored-{key}"}
    expected = {dest for dest, role in options.OPTION_ROLES.items()
                if role in options.TAKEN[kind] and dest in stored}
    assert taken == expected
    trunk = {"arch", "pool", "image_size"}
    assert trunk <= taken and ("model" in taken) == (kind != "init_from")
    assert ("lr" in taken) == (kind == "resume") and "checkpoint_dir" not in taken


def test_a_new_recipe_option_is_resumed_and_recorded_with_no_other_list(monkeypatch):
    monkeypatch.setattr(options, "OPTION_ROLES", dict(options.OPTION_ROLES))
    parser = main_voc2007.get_args_parser()
    options.add_option(parser, "--label-smoothing", type=float, default=0.0, role="recipe")
    args = options.parse_args(parser, ["data", "--resume", "ck.pth"])
    options.take_from_checkpoint(args, {"label_smoothing": 0.1, "epochs": 3}, "ck.pth")
    assert args.label_smoothing == 0.1
    assert options.recorded_settings(args)["label_smoothing"] == 0.1


def test_a_given_value_wins_over_the_checkpoints_with_a_warning():
    args = options.parse_args(main_voc2007.get_args_parser(),
                              ["data", "--resume", "ck.pth", "--pool", "avg"])
    with pytest.warns(UserWarning, match="pool: 'max' -> 'avg'"):
        options.take_from_checkpoint(args, {"pool": "max", "model": "baseline"}, "ck.pth")
    assert (args.pool, args.model) == ("avg", "baseline")


def test_without_a_checkpoint_the_papers_model_trunk_pooling_and_size():
    args = options.parse_args(main_voc2007.get_args_parser(), ["data"])
    options.take_from_checkpoint(args, {}, None)
    assert (args.model, args.arch, args.pool, args.image_size) == ("dsdl", "resnet101", "max", 448)
    assert isinstance(args, argparse.Namespace)
