"""unet.options + unet.cli.common.add_options: one definition per option, parsers built from it."""
import argparse
import dataclasses

import pytest

from unet.cli.common import HelpFormatter, add_options, options_from
from unet.data.datasets import DataOptions
from unet.options import identity_fields, option, option_fields
from unet.prediction.instances import InstanceOptions
from unet.prediction.tiling import TilingOptions


@dataclasses.dataclass(frozen=True)
class Toy:
    size: int = option(3, "a size", name="size", parse=int, group="toy")
    mode: str = option("a", "a mode", flags=("--mode", "--the_mode"), choices=("a", "b"), identity=True)
    fast: bool = option(False, "go fast", name="fast", switch="on", identity=True)
    fill: bool = option(True, "no fill", flags="--no-fill", switch="off")
    both: bool | None = option(None, "either way", name="both", switch="both")
    plain: int = 7  # no option: never a flag


def parse(argv, cls=Toy, **kw):
    p = argparse.ArgumentParser(prog="t.py", formatter_class=HelpFormatter)
    add_options(p, cls, **kw)
    return p, p.parse_args(argv)


def test_flags_dests_and_defaults_come_from_the_fields():
    p, args = parse([])
    assert vars(args) == {"size": 3, "mode": "a", "fast": False, "fill": True, "both": None}
    assert options_from(args, Toy) == Toy()
    flags = sorted(s for a in p._actions for s in a.option_strings)
    assert flags == sorted(["--both", "--fast", "--mode", "--no-both", "--no-fill", "--size", "--the_mode", "-h",
                            "--help"])


def test_values_round_trip_through_the_parser():
    _, args = parse(["--size", "5", "--the_mode", "b", "--fast", "--no-fill", "--no-both"])
    assert options_from(args, Toy) == Toy(size=5, mode="b", fast=True, fill=False, both=False)
    assert options_from(args, Toy, plain=1, size=9) == Toy(size=9, mode="b", fast=True, fill=False, both=False,
                                                           plain=1)


def test_help_lists_group_and_default():
    p, _ = parse([])
    text = p.format_help()
    assert "toy:" in text and "a size (default: 3)" in text


def test_inherit_makes_every_default_none_and_says_so():
    p, args = parse([], DataOptions, inherit="the checkpoint")
    assert vars(args) == {"data_dir": None, "fold": None, "folds": None, "fold_scheme": None, "seed": None,
                          "train_images": None, "train_labels": None, "val_images": None, "val_labels": None,
                          "val_slices": None}
    text = p.format_help()
    assert "(default: from the checkpoint)" in text and "(default: None)" not in text
    _, args = parse(["--fast"], inherit="x")
    assert args.fast is True and args.fill is None  # switches become store_const: unset stays None


def test_parse_errors_keep_their_message(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--tile-batch", "0"], TilingOptions)
    assert e.value.code == 2
    assert "argument --tile-batch: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--overlap", "1.5"], TilingOptions)
    assert "argument --overlap: must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_skip_and_only_choose_fields():
    p, args = parse([], TilingOptions, skip=("memory_budget_mb",))
    assert not hasattr(args, "memory_budget_mb")
    assert options_from(args, TilingOptions) == TilingOptions()
    _, args = parse(["--memory-budget-mb", "500"], TilingOptions, only=("memory_budget_mb",))
    assert vars(args) == {"memory_budget_mb": 500.0}


def test_identity_fields_are_the_marked_ones_in_order():
    assert identity_fields(Toy) == ("mode", "fast")
    assert identity_fields(DataOptions) == ("data_dir", "fold", "folds", "fold_scheme", "seed", "train_images",
                                            "train_labels", "val_images", "val_labels", "val_slices")


def test_instance_flags_are_prefixed_and_fill_is_inverted():
    _, args = parse(["--instance-threshold", "0.3", "--no-instance-fill"], InstanceOptions)
    assert options_from(args, InstanceOptions) == InstanceOptions(threshold=0.3, fill=False)
    assert [spec.flags[0] for _, spec in option_fields(InstanceOptions)] == [
        "--instance-threshold", "--instance-seeds", "--instance-h", "--instance-smooth", "--no-instance-fill"]


def test_option_needs_a_flag_and_a_known_switch():
    with pytest.raises(ValueError, match="flags= or name="):
        option(1, "x")
    with pytest.raises(ValueError, match="switch must be"):
        option(True, "x", name="x", switch="maybe")


@dataclasses.dataclass(frozen=True)
class People:
    names: list = option(help="a name (repeat)", flags="--name", switch="append", metavar="NAME",
                         default_factory=list)


def test_append_collects_repeats_and_each_parser_starts_empty():
    _, args = parse(["--name", "a", "--name", "b"], People)
    assert options_from(args, People) == People(names=["a", "b"])
    _, args = parse([], People)  # a fresh default list per parser: the first parse did not leak into it
    assert options_from(args, People) == People(names=[])


def test_flag_of_names_a_field_for_messages():
    from unet.export.bioimageio import PackageOptions
    from unet.options import flag_of
    assert flag_of(PackageOptions, "authors") == "--author" and flag_of(PackageOptions, "git_repo") == "--git-repo"
    assert flag_of(PackageOptions, "overwrite") is None  # export.py's own flag, not the package's
