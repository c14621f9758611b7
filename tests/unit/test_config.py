"""The config tree: precedence, value checks that name the flag, closest-key hints, --help rows."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from distclm import config
from distclm.cli import parse
from distclm.errors import UserError


def test_defaults_are_the_documented_ones():
    d = config.Config().data
    assert (d.source, d.split, d.text_field, d.join_with, d.txt_mode) == (None, "train", "text", " ", "file")
    assert (d.eos_between_docs, d.block_size, d.val_fraction, d.val_docs, d.seed) == (True, 128, 0.2, None, 0)
    assert (d.tokenizer, d.shard_blocks, d.num_workers, d.max_docs) == ("gpt2", 65536, None, None)


def test_precedence_defaults_preset_file_flags(tmp_path):
    path = tmp_path / "c.yaml"
    # The file overrides the preset (val_fraction, block_size); the flag overrides the file (block_size).
    path.write_text(yaml.safe_dump({"data": {"val_fraction": 0.3, "block_size": 64}, "train": {"lr": 1e-3}}))
    cfg = config.build_config("demo", str(path), {"data.block_size": "32"})
    assert cfg.data.source == "pydoc"        # preset only
    assert cfg.data.val_fraction == 0.3      # file > preset (0.1)
    assert cfg.data.block_size == 32         # flag > file > preset
    assert cfg.train.lr == 1e-3              # file > default
    assert cfg.data.seed == 0                # default untouched
    assert cfg.model.name == "gpt2-tiny"     # preset


def test_cli_parse_both_flag_forms_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  block_size: 64\n  max_docs: 7\n")
    inv = parse(["prepare", "--preset", "eli5-distilgpt2", "--config", str(path),
                 "--data.block_size", "16", "--data.seed=3", "--data.val_docs", "4"])
    d = inv.cfg.data
    assert (d.source, d.text_field, d.revision) == ("eli5_category", "answers.text", "refs/convert/parquet")
    assert (d.block_size, d.max_docs, d.seed, d.val_docs) == (16, 7, 3, 4)


@pytest.mark.parametrize("argv, expected", [
    (["--data.eos_between_docs=false"], False),
    (["--data.eos_between_docs", "false"], False),  # the `--section.key value` form, for a bool too
    (["--data.eos_between_docs", "0"], False),
    (["--data.eos_between_docs"], True),            # a bare bool flag means true
    (["--data.eos_between_docs", "--data.seed=1"], True),
])
def test_bool_flag_forms(argv, expected):
    assert parse(["prepare", *argv]).cfg.data.eos_between_docs is expected


def test_none_values_and_types():
    cfg = config.build_config(flags={"data.max_docs": "none", "data.val_fraction": "0.25", "data.revision": "null"})
    assert cfg.data.max_docs is None and cfg.data.revision is None and cfg.data.val_fraction == 0.25
    # A string field keeps "none"-looking text only where None is not allowed.
    assert config.build_config(flags={"data.split": "none"}).data.split == "none"


@pytest.mark.parametrize("key, value, expected", [
    ("data.block_size", "abc", "--data.block_size: expected an integer, got 'abc'"),
    ("data.block_size", "1.5", "--data.block_size: expected an integer, got '1.5'"),
    ("data.val_fraction", "x", "--data.val_fraction: expected a number, got 'x'"),
    ("data.eos_between_docs", "maybe", "--data.eos_between_docs: expected true or false, got 'maybe'"),
    ("data.txt_mode", "words", "--data.txt_mode: expected one of file, line, paragraph, got 'words'"),
])
def test_bad_value_names_flag_and_type(key, value, expected):
    with pytest.raises(UserError) as exc:
        config.build_config(flags={key: value})
    assert str(exc.value) == expected


def test_bad_value_in_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  block_size: [1, 2]\n")
    with pytest.raises(UserError, match=r"'data.block_size' in .*c.yaml: expected an integer"):
        config.build_config(file=str(path))


@pytest.mark.parametrize("key, hint", [
    ("data.blok_size", "--data.block_size"),
    ("data.text_feild", "--data.text_field"),
    ("train.weight_decy", "--train.weight_decay"),
])
def test_unknown_key_names_closest(key, hint):
    with pytest.raises(UserError) as exc:
        config.build_config(flags={key: "1"})
    assert str(exc.value) == f"unknown flag --{key} (did you mean {hint}?)"


def test_unknown_key_and_section_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  shard_blcks: 3\n")
    with pytest.raises(UserError, match=r"unknown key in .*: data.shard_blcks \(did you mean --data.shard_blocks\?\)"):
        config.build_config(file=str(path))
    path.write_text("dta:\n  seed: 3\n")
    with pytest.raises(UserError, match=r"unknown section .*'dta' \(did you mean 'data'\?\)"):
        config.build_config(file=str(path))


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"unknown --preset=dmeo \(did you mean demo\?\)"):
        config.build_config("dmeo")
    with pytest.raises(UserError, match="config file not found"):
        config.build_config(file=str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("flags, message", [
    ({"data.block_size": "1"}, "--data.block_size=1: must be an integer >= 2"),
    ({"data.block_size": "0"}, "--data.block_size=0: must be an integer >= 2"),
    ({"data.shard_blocks": "0"}, "--data.shard_blocks=0: must be an integer >= 1"),
    ({"data.val_fraction": "1"}, "--data.val_fraction=1: must be a finite number in [0, 1)"),
    ({"data.max_docs": "0"}, "--data.max_docs=0: must be an integer >= 1"),
    ({"data.num_workers": "0"}, "--data.num_workers=0: must be an integer >= 1"),
])
def test_validate_ranges(flags, message):
    with pytest.raises(UserError) as exc:
        config.build_config(flags=flags)
    assert str(exc.value).startswith(message)


def test_help_lines_cover_every_field_with_doc_and_default():
    rows = dict(config.help_lines())
    specs = config.field_specs()
    assert set(rows) == {f"--{k}" for k in specs}
    for key, (f, _tp) in specs.items():
        doc = rows[f"--{key}"]
        assert doc.startswith(f.metadata["doc"]), key
        assert "(default: " in doc, key
    assert rows["--data.block_size"].endswith("(default: 128)")
    assert rows["--data.txt_mode"].endswith("(default: file; one of file|line|paragraph)")
    assert rows["--data.source"].endswith("(default: none)")
    assert rows["--data.eos_between_docs"].endswith("(default: true)")


def test_to_yaml_round_trips():
    cfg = config.build_config("demo", flags={"data.block_size": "64", "data.join_with": "\n"})
    tree = yaml.safe_load(config.to_yaml(cfg))
    assert tree == dataclasses.asdict(cfg)
    again = config.build_config(flags={k: v for k, v in config.flatten(tree, "x").items()})
    assert again == cfg
