"""Chat / prompt_completion prepare through the CLI: byte-identical for any worker count, the loss mask on a
rendered sample, the packing report, and the refusals before training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distclm.data.blocks import LOSS, START, BlockReader
from tests.support.cli import run_cli
from tests.support.data import manifest_of, output_bytes, write_jsonl


def prepare(cli, out, *args):
    r = cli("prepare", f"--data.dir={out}", *args)
    assert r.code == 0, r.err
    return r


def test_chat_prepare_is_byte_identical_for_any_worker_count_and_reports_packing(cli, tmp_path):
    args = ("--data.source=pydoc-chat", "--data.block_size=128", "--data.shard_blocks=64", "--data.val_fraction=0.1")
    r = prepare(cli, tmp_path / "w1", *args, "--data.num_workers=1")
    prepare(cli, tmp_path / "w2", *args, "--data.num_workers=2")
    assert output_bytes(tmp_path / "w1") == output_bytes(tmp_path / "w2")
    assert any(n.endswith(".mask.bin") for n in output_bytes(tmp_path / "w1"))
    assert "format chat (detected)" in r.out
    m = manifest_of(tmp_path / "w1")
    assert (m["version"], m["data_format"], m["end_of_turn"]["id"]) == (2, "chat", m["eos_token_id"])
    t = m["splits"]["train"]
    print(f"train: {t['samples']} samples, {t['n_blocks']} blocks, packing efficiency {t['packing_efficiency']:.3f}, "
          f"supervised share {t['supervised_share']:.3f}, truncated {t['truncated']}")
    assert t["packing_efficiency"] > 0.85 and 0.3 < t["supervised_share"] < 1
    reader = BlockReader(tmp_path / "w1", verify=True)  # mask checksums too
    split = reader.split("train")
    flags = np.concatenate([split.flags(range(len(split)))])
    assert int((flags & START != 0).sum()) >= t["n_docs"]  # every packed sample starts a segment
    assert int(((flags[:, 1:] & LOSS) != 0).sum()) == t["n_supervised"]
    out = cli("inspect", str(tmp_path / "w1")).out
    assert "packing efficiency" in out and "supervised share" in out and "dropped with no supervised token" in out
    assert "<|im_start|>assistant\n[[" in out and "<|endoftext|>]]" in out  # the answers marked, with their EOS


def test_prompt_completion_mask_is_the_completion_and_its_eos(cli, tmp_path, hf_gpt2):
    rows = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}, because {i} + {i} = {2 * i}."}
            for i in range(40)] + [{"prompt": "Only a prompt " * 80, "completion": " cut"}]
    write_jsonl(tmp_path / "pc.jsonl", rows)
    r = prepare(cli, tmp_path / "out", f"--data.source={tmp_path / 'pc.jsonl'}", "--data.block_size=64",
                "--data.val_fraction=0")
    assert "format prompt_completion (detected)" in r.out
    split = BlockReader(tmp_path / "out").split("train")
    x, f = split[0], split.flags([0])[0]
    n = len(hf_gpt2(rows[0]["prompt"] + rows[0]["completion"])["input_ids"]) + 1
    labelled = hf_gpt2.decode(x[:n][(f[:n] & LOSS) != 0])
    assert labelled == rows[0]["completion"] + "<|endoftext|>"
    assert f[0] == START and hf_gpt2.decode(x[:n]) == rows[0]["prompt"] + rows[0]["completion"] + "<|endoftext|>"
    m = manifest_of(tmp_path / "out")["splits"]["train"]
    assert (m["samples"], m["n_docs"], m["dropped_overlong"]) == (41, 40, 1)  # its prompt alone fills the block


def test_train_refuses_a_folder_whose_end_of_turn_never_gets_loss(cli, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Say a lot."},
                          {"role": "assistant", "content": "word " * 100}]} for _ in range(30)]
    write_jsonl(tmp_path / "long.jsonl", rows)
    prepare(cli, tmp_path / "out", f"--data.source={tmp_path / 'long.jsonl'}", "--data.block_size=32")
    assert manifest_of(tmp_path / "out")["splits"]["train"]["truncated"] > 0
    r = run_cli("train", f"--data.dir={tmp_path / 'out'}", "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'run'}")
    line = r.error_line()
    assert "end-of-turn token '<|endoftext|>'" in line and "never gets loss" in line


def test_train_refuses_a_template_other_than_the_models_own(cli, tmp_path, hf_gpt2):
    from tests.unit.test_chat import CHATML

    model = tmp_path / "model"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(model)
    hf_gpt2.chat_template = CHATML
    hf_gpt2.save_pretrained(model)
    hf_gpt2.chat_template = None
    prepare(cli, tmp_path / "out", "--data.source=pydoc-chat", "--data.max_docs=60", "--data.block_size=128",
            "--data.chat_template=default")
    r = run_cli("train", f"--data.dir={tmp_path / 'out'}", f"--model.name={model}", f"--run.dir={tmp_path / 'run'}")
    line = r.error_line()
    assert "differs from the model tokenizer's own" in line and "--data.allow_template_mismatch=true" in line
    # the model's own template (auto) is what prepare takes from that tokenizer: same hash, accepted
    prepare(cli, tmp_path / "own", "--data.source=pydoc-chat", "--data.max_docs=60", "--data.block_size=128",
            f"--data.tokenizer={model}")
    assert json.loads((tmp_path / "own" / "manifest.json").read_text())["chat_template"] == CHATML


def test_generate_in_chat_mode_stops_at_end_of_turn_and_prints_only_the_answer():
    from types import SimpleNamespace

    import torch

    from distclm.data.chat import DEFAULT_TEMPLATE, render
    from distclm.data.tokenize import load_hf_tokenizer
    from distclm.generate import generate
    from distclm.model import build_model

    tok, model = load_hf_tokenizer("gpt2")[0], build_model("gpt2-tiny", 0)
    gen = SimpleNamespace(max_new_tokens=8, do_sample=False, num_return_sequences=1, top_k=50, top_p=0.95,
                          temperature=1.0, seed=0)
    prompt = render(DEFAULT_TEMPLATE, [{"role": "user", "content": "What is a list?"}], True,
                    {"eos_token": tok.eos_token, "bos_token": ""})
    assert prompt.endswith("<|endoftext|><|im_start|>assistant\n")
    x = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    new = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.eos_token_id)[0, x.size(1):].tolist()  # the greedy answer, no stop met
    k = next(i for i in range(1, len(new)) if new[i] not in new[:i])  # a token first seen at position k
    answer = generate(model, tok, ["What is a list?"], gen, chat=(DEFAULT_TEMPLATE, [tok.eos_token_id, new[k]]))
    assert answer == [[tok.decode(new[:k], skip_special_tokens=True)]]  # only the answer, cut at the end of turn


def test_an_interrupted_chat_prepare_resumes_to_identical_bytes(tmp_path):
    """Stopped right after the first resume state is saved (open blocks of the packer, counters and all), then run
    again: the same bytes as a run that was never stopped."""
    import gzip

    from distclm.config import build_config
    from distclm.data.prepare import prepare as prepare_fn
    from distclm.data.sources import PYDOC_CHAT

    rows = [json.loads(line) for line in gzip.open(PYDOC_CHAT, "rt")] * 4  # 1,632 records: 4 chunks
    write_jsonl(tmp_path / "chat.jsonl", rows)

    def cfg(out):
        return build_config(None, None, {"data.source": str(tmp_path / "chat.jsonl"), "data.block_size": "64",
                                         "data.shard_blocks": "40", "data.num_workers": "1", "data.dir": str(out)})

    class Stop(Exception):
        pass

    class StopAfterState:
        def update(self, **_):
            if (tmp_path / "cut" / ".prepare-state.json").exists():
                raise Stop

        def note(self, _):
            pass

    prepare_fn(cfg(tmp_path / "whole"))
    with pytest.raises(Stop):
        prepare_fn(cfg(tmp_path / "cut"), StopAfterState())
    assert not (tmp_path / "cut" / "manifest.json").exists()
    state = json.loads((tmp_path / "cut" / ".prepare-state.json").read_text())
    assert 0 < state["next_doc"] < len(rows) and state["splits"]["train"]["open"]  # mid-corpus, blocks open
    prepare_fn(cfg(tmp_path / "cut"))
    assert output_bytes(tmp_path / "cut") == output_bytes(tmp_path / "whole")


def test_a_mixture_of_text_and_chat_folders_reads_text_blocks_as_all_labels(cli, tmp_path, pydoc_prepared):
    from distclm.data.loader import MixedBlocks

    prepare(cli, tmp_path / "chat", "--data.source=pydoc-chat", "--data.max_docs=80", "--data.block_size=128")
    text, chat_split = BlockReader(pydoc_prepared).split("train"), BlockReader(tmp_path / "chat").split("train")
    assert text.flags([0]) is None  # version 1: every token a label
    mixed = MixedBlocks([text, chat_split])
    f = mixed.flags([1, len(text) + 2])
    assert f[0, 0] == START and (f[0, 1:] == LOSS).all()
    assert (f[1] == chat_split.flags([2])[0]).all()
    assert MixedBlocks([text, text]).flags([0]) is None


@pytest.mark.extended
def test_run_chat_demo_samples_only_an_answer(tmp_path):
    """`distclm run --preset=chat-demo`, shrunk to 6 steps on 1 process: the sample is the answer alone (the
    prompt's question is not printed back), and the export renders prompts with the data's template."""
    from tests.support.env import REPO, child_env

    args = ["run", "--preset=chat-demo", f"--data.dir={tmp_path / 'data'}", f"--run.dir={tmp_path / 'run'}",
            "--train.max_steps=6", "--run.nproc=1", "--gen.max_new_tokens=12"]
    r = run_cli(*args, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), timeout=600)
    assert r.code == 0, r.err[-3000:]
    lines = r.out.splitlines()
    sample = lines[lines.index(next(ln for ln in lines if ln.startswith("== sample"))) + 1]
    assert "What is a list in Python?" not in sample and "<|im_start|>" not in sample
    assert (tmp_path / "run" / "export" / "chat_template.jinja").exists() or \
        "chat_template" in (tmp_path / "run" / "export" / "tokenizer_config.json").read_text()
