"""Rule 2 of issue 28 on model folders (--model.name=FOLDER, one process): weights that are a pickle with code and
a model that brings its own code are refused in train, eval and generate with one line, and nothing runs.
(Checkpoints of every strategy: tests/dist/test_trust_code.py.)"""

from __future__ import annotations

import json

import pytest

from tests.support.payload import plant

COMMANDS = {
    "train": ["train", "--data.dir={data}", "--run.dir={tmp}/run", "--train.max_steps=1", "--train.micro_batch_size=4"],
    "eval": ["eval", "--data.dir={data}", "--eval.max_blocks=2"],
    "generate": ["generate", "--prompt", "hello", "--gen.max_new_tokens=2"],
}


def command(name, data, tmp, model):
    return [a.format(data=data, tmp=tmp) for a in COMMANDS[name]] + [f"--model.name={model}"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from transformers import GPT2Config

    folder = tmp_path_factory.mktemp("config")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_pickled_weights_in_a_model_folder_are_refused(cli, pydoc_blocks, tmp_path, tiny_config, name):
    model, marker = tmp_path / "model", tmp_path / "marker"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_config))
    bad = plant(model / "pytorch_model.bin", marker)  # transformers' legacy weights file, no safetensors beside it
    line = cli(*command(name, pydoc_blocks, tmp_path, model)).error_line()
    assert f"refusing to load {bad}: it holds builtins.exec" in line, line
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_remote_code_stays_off_and_its_refusal_names_the_flag(cli, pydoc_blocks, tmp_path, tiny_config, name):
    model, marker = tmp_path / "model", tmp_path / "marker"
    model.mkdir()
    config = {**tiny_config, "model_type": "my-model",
              "auto_map": {"AutoConfig": "my_model.MyConfig", "AutoModelForCausalLM": "my_model.MyModel"}}
    (model / "config.json").write_text(json.dumps(config))
    (model / "my_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import GPT2Config as MyConfig, GPT2LMHeadModel as MyModel\n")
    line = cli(*command(name, pydoc_blocks, tmp_path, model)).error_line()
    assert "--model.trust_remote_code=true" in line and str(model) in line, line
    assert not marker.exists(), "the folder's code ran"
