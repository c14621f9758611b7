"""Chat data: spans found by rendering the template, samples packed whole, the masked loss (fused and the model's
own) against a plain cross-entropy with ignored targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distclm.data import chat
from distclm.data.blocks import LOSS, START
from distclm.data.samples import Renderer, SamplePacker, chunk_arrays, encode_samples

SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": ""}
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
         {"role": "assistant", "content": "A mutable sequence."}, {"role": "user", "content": "And a tuple?"},
         {"role": "assistant", "content": "An immutable one."}]
# A ChatML template as Qwen2-style tokenizers ship it: the turn closes with <|im_end|> and a newline.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_default_template_supervises_each_answer_and_its_eos():
    pieces = chat.chat_pieces(CONVO, chat.DEFAULT_TEMPLATE, SPECIALS, "assistant")
    assert "".join(t for t, _ in pieces) == chat.render(chat.DEFAULT_TEMPLATE, CONVO, False, SPECIALS)
    assert [t for t, s in pieces if s] == ["A mutable sequence.<|endoftext|>", "An immutable one.<|endoftext|>"]
    assert pieces[0] == ("<|im_start|>system\nBe brief.<|endoftext|><|im_start|>user\nWhat is a list?<|endoftext|>"
                         "<|im_start|>assistant\n", False)


def test_a_tokenizer_template_gets_its_own_end_of_turn():
    pieces = chat.chat_pieces(CONVO, CHATML, SPECIALS, "assistant")
    assert [t for t, s in pieces if s] == ["A mutable sequence.<|im_end|>\n", "An immutable one.<|im_end|>\n"]
    tail, eot = chat.end_of_turn(CHATML, SPECIALS, lambda text: [len(text)])
    assert tail == "<|im_end|>\n" and eot == len(tail)
    assert chat.chat_pieces(CONVO, CHATML, SPECIALS, "all") == [(t, True) for t, _ in pieces]


def test_a_template_that_rewrites_the_past_is_refused():
    # The last message is rendered differently from the others: prefixes do not extend each other.
    odd = "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="not prefix-stable at message 2"):
        chat.chat_pieces(CONVO, odd, SPECIALS, "assistant")


def test_prompt_completion_and_format_detection():
    class D:
        messages_field, prompt_field, completion_field = "messages", "prompt", "completion"

    assert chat.completion_pieces("Q: 2+2?", " 4", "<eos>", "assistant") == [("Q: 2+2?", False), (" 4<eos>", True)]
    assert chat.detect_format({"messages": []}, D) == "chat"
    assert chat.detect_format({"prompt": "a", "completion": "b"}, D) == "prompt_completion"
    assert chat.detect_format({"text": "a"}, D) == "text"


def sample(n_prompt: int, n_answer: int, base: int = 0):
    """A sample's (tokens, flags) as chunk_arrays makes them: a prompt piece, then an answer piece."""
    tokens, flags, _, _ = chunk_arrays([np.arange(base, base + n_prompt), np.arange(base + 100, base + 100 + n_answer)],
                                       [False, True], [2])
    return tokens, flags


def encode(rows, block_size=5, overlong="truncate"):
    """prompt_completion rows of " a" x n (n GPT-2 tokens each) through the real tokenizer -> (samples, counts)."""
    from types import SimpleNamespace

    from distclm.data.tokenize import load_tokenizer

    d = SimpleNamespace(prompt_field="prompt", completion_field="completion", train_on="assistant", source="rows")
    renderer = Renderer(d, "prompt_completion", None, SPECIALS, 50256)
    records = [{"prompt": " a" * p, "completion": " b" * c} for p, c in rows]
    return encode_samples(load_tokenizer("gpt2"), renderer, records, ["train"] * len(rows), 0, block_size,
                          overlong)["train"]


def test_sample_flags_truncation_and_drops():
    (kept, counts) = encode([(2, 2)], block_size=8)
    assert kept[0][1].tolist() == [START, 0, LOSS, LOSS, LOSS]  # the first token is never a label; EOS is one
    assert counts["n_supervised"] == 3 and counts["eot_supervised"] == 1
    kept, counts = encode([(3, 4), (6, 4), (2, 0), (1, 1)], block_size=5)
    # (3, 4) cut: the prompt kept, the answer cut (and its EOS); (6, 4): the prompt alone fills the block;
    # (2, 0): an empty completion still teaches the EOS
    assert [f.tolist() for _, f in kept] == [[START, 0, 0, LOSS, LOSS], [START, 0, LOSS], [START, LOSS, LOSS]]
    assert (counts["samples"], counts["truncated"], counts["dropped_overlong"], counts["eot_supervised"]) == (4, 1, 1, 2)
    kept, counts = encode([(3, 4)], block_size=5, overlong="drop")
    assert not kept and counts["dropped_overlong"] == 1


def test_a_conversation_without_an_answer_is_dropped_and_counted():
    from types import SimpleNamespace

    from distclm.data.tokenize import load_tokenizer

    d = SimpleNamespace(messages_field="messages", train_on="assistant", source="rows")
    renderer = Renderer(d, "chat", chat.DEFAULT_TEMPLATE, SPECIALS, 50256)
    records = [{"messages": CONVO[:2]}, {"messages": CONVO[:3]}]
    kept, counts = encode_samples(load_tokenizer("gpt2"), renderer, records, ["train", "train"], 0, 128,
                                  "truncate")["train"]
    assert len(kept) == 1 and counts["dropped_unsupervised"] == 1 and counts["eot_supervised"] == 1


def test_first_fit_packing_keeps_samples_whole_and_pads_with_masked_segments():
    lengths = [6, 3, 5, 2, 7, 1, 4, 8, 2]
    samples = [sample(1, n - 1, base=10 * i) for i, n in enumerate(lengths)]
    packer = SamplePacker(block_size=8, dtype=np.dtype(np.uint16), pad_id=9999, window=2)
    blocks, flags = packer.feed(samples)
    rest = packer.flush()
    blocks, flags = np.concatenate([blocks, rest[0]]), np.concatenate([flags, rest[1]])
    # every sample appears exactly once, contiguous, starting at a START flag
    for tokens, _ in samples:
        hits = [(r, c) for r in range(len(blocks)) for c in range(8 - len(tokens) + 1)
                if blocks[r, c:c + len(tokens)].tolist() == tokens.tolist()]
        assert len(hits) == 1 and flags[hits[0][0], hits[0][1]] == START
    pad = blocks == 9999
    assert (flags[pad] & LOSS == 0).all()
    assert int((~pad).sum()) == sum(lengths)
    # first fit over a window of 2, blocks written as they fill: [3,5] [6,2] [7,1] [8], then [4,2] padded at the end
    assert [int((~p).sum()) for p in pad] == [8, 8, 8, 8, 6]
    assert blocks[0, :3].tolist() == samples[1][0].tolist() and blocks[0, 3:].tolist() == samples[2][0].tolist()
    again = SamplePacker(8, np.dtype(np.uint16), 9999, window=2)
    b2 = np.concatenate([again.feed(samples)[0], again.flush()[0]])
    assert (b2 == blocks).all()  # deterministic


def test_segment_positions_restart_at_every_sample_start():
    from distclm.loss import masked_labels, segment_positions

    f = torch.tensor([[START, LOSS, LOSS, START, 0, LOSS, START, 0]], dtype=torch.uint8)
    assert segment_positions(f).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]
    x = torch.arange(8)[None]
    assert masked_labels(x, f).tolist() == [[-100, 1, 2, -100, -100, 5, -100, -100]]


@pytest.mark.parametrize("fused", [False, True])
def test_masked_loss_and_gradient_match_cross_entropy_with_ignored_targets(fused):
    from distclm.loss import install, masked_labels, masked_nll_sum, segment_positions
    from distclm.model import build_model

    model = build_model("gpt2-tiny", 0)
    install(model, fused)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (2, 32), generator=g)
    flags = torch.where(torch.rand(2, 32, generator=g) < 0.5, LOSS, 0).to(torch.uint8)
    flags[:, 0], flags[0, 17] = START, START
    got = masked_nll_sum(model, x, flags)
    got.backward()
    mine = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=x, position_ids=segment_positions(flags), use_cache=False).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                            masked_labels(x, flags)[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    assert torch.allclose(got, ref, rtol=1e-5)
    for a, p in zip(mine, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # eval: the float64 sum over the labels only
        evaluated = masked_nll_sum(model, x, flags)
    assert evaluated.dtype == torch.float64 and abs(float(evaluated) - ref.item()) < 1e-3
