"""`distclm generate` against transformers' own `generate`, and `distclm run` from prepare to a sample (one process).

The model is a random-init gpt2-tiny saved as an export would be (safetensors, vendored tokenizer,
the tutorial's generation_config.json): the text is gibberish, but the same seed and settings must
give exactly the same gibberish as a direct `model.generate` call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from tests.support.cli import run_cli
from tests.support.env import REPO, child_env

PROMPTS = ["The with statement", "A class definition creates a new local namespace and", "Unicode"]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from distclm import config
    from distclm.data.tokenize import load_hf_tokenizer
    from distclm.hf_folder import write_generation_config
    from distclm.model import build_model

    out = tmp_path_factory.mktemp("tiny-export")
    build_model("gpt2-tiny", 0).save_pretrained(out)
    tok = load_hf_tokenizer("gpt2")[0]
    tok.save_pretrained(out)
    write_generation_config(config.build_config(None, None, {}).gen, tok, out)
    return out


@pytest.fixture(scope="module")
def direct(tiny_export):
    """Texts from transformers alone: AutoModel/AutoTokenizer, set_seed, model.generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    model = AutoModelForCausalLM.from_pretrained(tiny_export).eval()
    tok = AutoTokenizer.from_pretrained(tiny_export)
    tok.padding_side, tok.pad_token = "left", tok.eos_token

    def run(prompts: list[str], seed: int = 0, **kwargs) -> list[str]:
        enc = tok(prompts, return_tensors="pt", padding=True)
        set_seed(seed)
        with torch.no_grad():
            out = model.generate(**enc, pad_token_id=tok.eos_token_id, **kwargs)
        return tok.batch_decode(out, skip_special_tokens=True)

    return run


def test_defaults_are_the_tutorials_and_match_direct_generate(cli, tiny_export, direct):
    r = cli("generate", f"--model.name={tiny_export}", "--prompt", PROMPTS[0])
    assert r.code == 0, r.err
    expected = direct(PROMPTS[:1], max_new_tokens=100, do_sample=True, top_k=50, top_p=0.95)[0]
    assert r.out == expected + "\n"
    assert r.out.startswith(PROMPTS[0])  # the full text: prompt + continuation
    assert expected != direct(PROMPTS[:1], max_new_tokens=100, do_sample=False)[0]  # it did sample


def test_every_gen_flag_reaches_generate(cli, tiny_export, direct):
    flags = ["--gen.max_new_tokens=15", "--gen.top_k=5", "--gen.top_p=0.8", "--gen.temperature=0.7",
             "--gen.seed=11", "--gen.num_return_sequences=3"]
    r = cli("generate", f"--model.name={tiny_export}", f"--prompt={PROMPTS[1]}", *flags)
    assert r.code == 0, r.err
    texts = direct(PROMPTS[1:2], seed=11, max_new_tokens=15, do_sample=True, top_k=5, top_p=0.8,
                   temperature=0.7, num_return_sequences=3)
    assert r.out == "".join(f"--- sample {i + 1}/3\n{t}\n" for i, t in enumerate(texts))
    assert len(set(texts)) == 3
    other = cli("generate", f"--model.name={tiny_export}", f"--prompt={PROMPTS[1]}", *flags[:-2], "--gen.seed=12")
    assert other.out != texts[0] + "\n"  # the seed matters


def test_batched_prompts_are_left_padded_greedy_equals_one_by_one(cli, tiny_export, direct, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n" + PROMPTS[2] + "\n")  # the blank line is skipped
    r = cli("generate", f"--model.name={tiny_export}", f"--prompt-file={path}", "--gen.do_sample=false",
            "--gen.max_new_tokens=12")
    assert r.code == 0, r.err
    one_by_one = [direct([p], max_new_tokens=12, do_sample=False)[0] for p in PROMPTS]
    assert r.out == "".join(f"{t}\n\n" for t in one_by_one)
    # the same batch through transformers (left padding, eos as pad) gives the same texts
    assert direct(PROMPTS, max_new_tokens=12, do_sample=False) == one_by_one


def test_prompts_on_stdin(tiny_export, direct):
    proc = subprocess.run([sys.executable, "-m", "distclm.cli", "generate", f"--model.name={tiny_export}",
                           "--gen.max_new_tokens=8", "--gen.seed=3"], input="\n".join(PROMPTS[:2]) + "\n",
                          env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    texts = direct(PROMPTS[:2], seed=3, max_new_tokens=8, do_sample=True, top_k=50, top_p=0.95)
    assert proc.stdout == "".join(f"{t}\n\n" for t in texts)


@pytest.mark.parametrize("flags,expected", [
    (["--gen.do_sample=false", "--gen.num_return_sequences=2"],
     "--gen.num_return_sequences=2 needs --gen.do_sample=true"),
    (["--prompt-file={tmp}/missing.txt"], "--prompt-file="),
    (["--prompt-file={tmp}/blank.txt"], "only empty lines"),
    (["--prompt="], "--prompt is empty"),
    (["--prompt=" + "word " * 1100], "exceeds the model's 1024 positions"),
])
def test_bad_generate_input_is_one_line(cli, tiny_export, tmp_path, flags, expected):
    (tmp_path / "blank.txt").write_text("\n  \n")
    flags = [f.format(tmp=tmp_path) for f in flags]
    if not any(f.startswith(("--prompt", "--prompt-file")) for f in flags):
        flags.append("--prompt=hello")
    line = cli("generate", f"--model.name={tiny_export}", "--gen.max_new_tokens=4", *flags).error_line()
    assert expected in line, line


def test_eli5_preset_offline_fails_fast_with_one_line(tmp_path):
    t0 = time.perf_counter()
    r = run_cli("run", "--preset=eli5-distilgpt2", cwd=tmp_path, timeout=60)  # HF_HUB_OFFLINE=1 (conftest)
    elapsed = time.perf_counter() - t0
    line = r.error_line()
    for text in ("not reachable", "dataset eli5_category", "model distilgpt2",
                 "hf download eli5_category --repo-type dataset --revision refs/convert/parquet",
                 "hf download distilgpt2", "--data.source=", "--data.text_field=answers.text", "--model.name="):
        assert text in line, (text, line)
    assert elapsed < 20, elapsed  # seconds, not the minutes of huggingface_hub's retries
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_eli5_preset_through_the_real_probe_fails_fast(tmp_path):
    env = child_env(HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    t0 = time.perf_counter()
    r = run_cli("run", "--preset=eli5-distilgpt2", cwd=tmp_path, env=env, timeout=60)
    assert "--model.name=MODEL" in r.error_line()
    assert time.perf_counter() - t0 < 20


@pytest.mark.slow  # the whole demo on two processes (~25 s)
def test_run_demo_prepares_trains_evaluates_exports_and_samples(tmp_path):
    """`distclm run` with training on 2 processes (torchrun), shrunk to 50 train blocks and 4 steps (DDP: the
    ZeRO paths are the train tests' business); then the same command again, as `make demo` twice would."""
    args = ["run", "--preset=demo", f"--data.dir={tmp_path / 'data'}", f"--run.dir={tmp_path / 'run'}",
            "--data.max_docs=5", "--data.val_docs=3", "--data.block_size=64", "--train.max_steps=4",
            "--run.nproc=2", "--train.strategy=ddp", "--gen.max_new_tokens=12"]
    env = child_env(OMP_NUM_THREADS="1")
    r = run_cli(*args, cwd=REPO, env=env, timeout=300)
    assert r.code == 0, r.err[-3000:]
    lines = r.out.splitlines()
    assert "prepared train 50 blocks, validation 31 blocks of 64 tokens" in lines
    before = next(ln for ln in lines if ln.startswith("== perplexity before training:"))
    after = next(ln for ln in lines if ln.startswith("== perplexity after training:"))
    ppl_before, ppl_after = float(before.split()[4]), float(after.split()[4])
    assert ppl_after < ppl_before  # 4 steps at lr up to 1e-3 already help
    export = tmp_path / "run" / "export"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    sample = lines[lines.index(next(ln for ln in lines if ln.startswith("== sample"))) + 1]
    assert sample.startswith("The with statement")
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last_eval = [e for e in evals if e["type"] == "eval"][-1]
    assert last_eval["step"] == 4 and f"{last_eval['eval_perplexity']:.2f}" == after.split()[4].rstrip(" (")

    again = run_cli(*args, cwd=REPO, env=env, timeout=300)  # the same command on a finished run
    assert again.code == 0, again.err[-3000:]
    assert "reused complete train 50 blocks, validation 31 blocks of 64 tokens" in again.out
    assert next(ln for ln in again.out.splitlines() if ln.startswith("== perplexity after")) == after
    assert sample in again.out.splitlines()  # same seed, same model: the same sample


@pytest.fixture(scope="module")
def chat_export(tmp_path_factory):
    """gpt2-tiny with the default chat template whose every position predicts one token: the final LayerNorm
    outputs a constant vector b (weight 0, bias b) and that token's (tied) embedding is 10 b, so greedy decoding
    always picks it. -> {token: folder} for EOS (an empty answer) and " " (id 220: whitespace only)."""
    from distclm.data.chat import DEFAULT_TEMPLATE
    from distclm.data.tokenize import load_hf_tokenizer
    from distclm.model import build_model

    folders = {}
    for name, token in (("eos", 50256), ("space", 220)):
        model = build_model("gpt2-tiny", 0)
        with torch.no_grad():
            b = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(1))
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(b)
            model.transformer.wte.weight[token] = 10 * b
        out = tmp_path_factory.mktemp(f"chat-{name}")
        model.save_pretrained(out)
        tok = load_hf_tokenizer("gpt2")[0]
        tok.chat_template = DEFAULT_TEMPLATE
        tok.save_pretrained(out)
        folders[name] = out
    return folders


@pytest.mark.parametrize("case, said", [("eos", "the model ended its answer at once (0 new tokens)"),
                                        ("space", "the model's answer is only whitespace (4 characters: '    ')")])
def test_an_empty_chat_answer_is_said_on_stderr_not_printed_blank(cli, chat_export, case, said):
    r = cli("generate", f"--model.name={chat_export[case]}", "--prompt=Hi", "--gen.chat=true",
            "--gen.do_sample=false", "--gen.max_new_tokens=4")
    assert r.code == 0 and r.out == "", (r.out, r.err)
    assert r.err.strip().splitlines() == [f"distclm: note: {said}"]


def test_generate_without_chat_on_a_chat_model_names_gen_chat(cli, chat_export, tiny_export):
    r = cli("generate", f"--model.name={chat_export['space']}", "--prompt=Hi", "--gen.do_sample=false",
            "--gen.max_new_tokens=4")
    assert r.code == 0 and r.out == "Hi    \n"
    assert "--gen.chat=true" in r.err and "chat template" in r.err
    plain = cli("generate", f"--model.name={tiny_export}", "--prompt=Hi", "--gen.max_new_tokens=4")
    assert "--gen.chat" not in plain.err  # a model without a chat template: no note
