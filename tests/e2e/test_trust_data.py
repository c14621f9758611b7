"""Trust on the data side (issue 28): a hand-edited manifest, shards outside their folder, ids outside the vocabulary,
chat content as parts, broken chat templates, .json shapes and invalid UTF-8. Every refusal is exit 2 with one line
naming the file (and field, record or line), and leaves every user file byte-identical."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distclm.data.sources import SourceSpec, documents, records
from tests.support.cli import run_cli
from tests.support.data import manifest_of, write_jsonl


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under `roots` (links as their target text) -> its bytes: compared before and after a refusal."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if p.is_symlink():
                out[str(p)] = str(p.readlink()).encode()
            elif p.is_file():
                out[str(p)] = p.read_bytes()
    return out


def refused(result, *expected: str) -> str:
    line = result.error_line()  # exit 2, one line, no traceback
    for text in expected:
        assert text in line, (text, line)
    return line


@pytest.fixture
def folder(pydoc_prepared, tmp_path) -> Path:
    return Path(shutil.copytree(pydoc_prepared, tmp_path / "prepared"))


def edit(folder: Path, change) -> None:
    m = manifest_of(folder)
    change(m)
    (folder / "manifest.json").write_text(json.dumps(m, indent=1))


def setter(path: str, value):
    """A change that sets the dotted `path` (ints index lists) to `value`, or deletes it when value is DELETE."""
    def change(m):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for k in parents:
            m = m[k]
        if value is DELETE:
            del m[last]
        else:
            m[last] = value
    return change


DELETE = object()

# (field to change, new value, what the line must say after "DIR/manifest.json: ")
MUTATIONS = [
    ("splits.train.n_blocks", "many", 'splits.train.n_blocks must be an integer >= 0, found "many"'),
    ("splits", [], "splits must be an object of splits"),
    ("vocab_size", None, "vocab_size must be an integer >= 1, found null"),
    ("splits.train.shards", DELETE, "splits.train.shards missing (must be a list)"),
    ("splits.train", [], "splits.train must be an object, found []"),
    ("block_size", 1, "block_size must be an integer >= 2, found 1"),
    ("block_size", "128", 'block_size must be an integer >= 2, found "128"'),
    ("block_size", True, "block_size must be an integer >= 2, found true"),
    ("dtype", "int8", 'dtype must be one of "uint16", "uint32", found "int8"'),
    ("eos_token_id", 50257, "eos_token_id must be below vocab_size (50257), found 50257"),
    ("vocab_size", 70000, "vocab_size must be at most 65536 with dtype uint16, found 70000"),
    ("tokenizer", DELETE, "tokenizer missing (must be an object)"),
    ("tokenizer.sha256", 12, "tokenizer.sha256 must be 64 lowercase hex digits, found 12"),
    ("splits.train.shards.0.n_blocks", -1, "splits.train.shards[0].n_blocks must be an integer >= 0, found -1"),
    ("splits.train.shards.0.sha256", "abc", 'splits.train.shards[0].sha256 must be 64 lowercase hex digits'),
    ("splits.validation.n_blocks", 1, "splits.validation.n_blocks must be the sum of its shards' n_blocks (144)"),
    ("splits.train.shards.1.file", "train-00000.bin", "splits.train.shards[1].file must be a file no other shard"),
    ("splits.train.shards.0.file", "../train-00000.bin",
     'splits.train.shards[0].file must be a plain file name inside the folder, found "../train-00000.bin"'),
    ("splits.train.shards.0.file", "/etc/hostname",
     'splits.train.shards[0].file must be a plain file name inside the folder, found "/etc/hostname"'),
    ("splits.train.shards.0.file", "sub/train-00000.bin", "splits.train.shards[0].file must be a plain file name"),
]


@pytest.mark.parametrize("path, value, message", MUTATIONS, ids=[f"{m[0]}={m[1]!r}"[:60] for m in MUTATIONS])
def test_a_manifest_edited_wrong_is_one_line_naming_the_field(cli, folder, path, value, message):
    edit(folder, setter(path, value))
    before = snapshot(folder)
    for args in ([folder], [folder, "--verify"]):
        refused(cli("inspect", *args), f"{folder / 'manifest.json'}: {message}")
    assert snapshot(folder) == before


@pytest.mark.slow  # real processes or many rounds: make test, not test-fast
@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_refuse_a_bad_manifest_the_same_way(folder, tmp_path, command):
    edit(folder, setter("splits.train.n_blocks", "many"))
    before = snapshot(folder)
    r = run_cli(command, f"--data.dir={folder}", "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'run'}")
    refused(r, f"{folder / 'manifest.json'}: splits.train.n_blocks must be an integer >= 0, found \"many\"")
    assert snapshot(folder) == before and not (tmp_path / "run").exists()


def test_a_shard_linked_out_of_the_folder_is_refused(cli, folder, tmp_path):
    outside = tmp_path / "elsewhere.bin"
    shutil.copy(folder / "train-00001.bin", outside)  # the same bytes: size and checksum would pass
    (folder / "train-00001.bin").unlink()
    (folder / "train-00001.bin").symlink_to(outside)
    before = snapshot(folder, outside)
    refused(cli("inspect", folder), f"{folder / 'train-00001.bin'}: a link to {outside}, outside {folder}")
    assert snapshot(folder, outside) == before


def test_a_link_inside_the_folder_is_still_read(cli, folder):
    (folder / "copy.bin").write_bytes((folder / "train-00001.bin").read_bytes())
    (folder / "train-00001.bin").unlink()
    (folder / "train-00001.bin").symlink_to("copy.bin")
    r = cli("inspect", folder, "--verify")
    assert r.code == 0 and "checksums  ok (sha256 of every shard matches the manifest; every id < vocab_size 50257)" \
        in r.out


def plant_id(folder: Path, shard: str, index: int, value: int) -> None:
    """Put `value` at token `index` of `shard` and record the new sha256: a consistent checksum, a wrong id."""
    path = folder / shard
    ids = np.fromfile(path, dtype="<u2")
    ids[index] = value
    ids.tofile(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    edit(folder, lambda m: [s.update(sha256=digest) for split in m["splits"].values() for s in split["shards"]
                            if s["file"] == shard])


@pytest.mark.parametrize("value", [50257, 65535])
def test_verify_refuses_ids_outside_the_vocabulary(cli, folder, value):
    plant_id(folder, "train-00003.bin", 1000, value)
    before = snapshot(folder)
    assert cli("inspect", folder).code == 0  # without --verify only the sizes are checked
    refused(cli("inspect", folder, "--verify"), f"{folder / 'train-00003.bin'}: holds token id {value}, "
                                                f"but the manifest's vocab_size is 50257")
    assert snapshot(folder) == before


def test_train_verifies_ids_on_first_use(folder, tmp_path):
    plant_id(folder, "validation-00001.bin", 7, 60000)
    r = run_cli("train", f"--data.dir={folder}", "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'run'}",
                "--train.max_steps=1")
    refused(r, f"{folder / 'validation-00001.bin'}: holds token id 60000")


def test_verify_refuses_a_flag_byte_that_is_no_known_bit(cli, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [chat("q", "a " * 20)] * 20)
    out = prepare_ok(cli, tmp_path, tmp_path / "c.jsonl")
    mask = out / "train-00000.mask.bin"
    data = bytearray(mask.read_bytes())
    data[5] = 9
    mask.write_bytes(bytes(data))
    edit(out, lambda m: m["splits"]["train"]["shards"][0].update(mask_sha256=hashlib.sha256(data).hexdigest()))
    refused(cli("inspect", out, "--verify"), f"{mask}: holds flag byte 9")


def test_verify_costs_about_the_checksum(tmp_path):
    """The id maximum rides on the checksum's read: measured on 64 MiB of uint16 shards (printed; -s to see)."""
    import time

    from distclm.data.blocks import file_sha256, scan

    path = tmp_path / "big.bin"
    np.random.default_rng(0).integers(0, 50257, size=32 << 20, dtype=np.uint16).tofile(path)
    best = {}
    for name, fn in (("sha256", lambda: file_sha256(path)), ("sha256+max", lambda: scan(path, np.dtype(np.uint16)))):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    print(f"64 MiB: sha256 {best['sha256']:.3f} s, sha256 + max {best['sha256+max']:.3f} s "
          f"(+{best['sha256+max'] / best['sha256'] - 1:.0%})")
    assert scan(path, np.dtype(np.uint16))[1] == int(np.fromfile(path, dtype="<u2").max())
    assert best["sha256+max"] < 1.5 * best["sha256"]


# ---------------------------------------------------------------------------------------------
# Chat content as parts


def chat(user, answer) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def prepare_ok(cli, tmp_path, source, *args, name="out") -> Path:
    out = tmp_path / name
    r = cli("prepare", f"--data.source={source}", f"--data.dir={out}", "--data.block_size=64",
            "--data.val_fraction=0", *args)
    assert r.code == 0, r.err
    return out


def prepare_refused(cli, tmp_path, source, *args) -> str:
    out = tmp_path / "refused"
    inputs = snapshot(*[p for p in tmp_path.iterdir() if p != out])
    line = cli("prepare", f"--data.source={source}", f"--data.dir={out}", "--data.block_size=64", *args).error_line()
    assert snapshot(*[p for p in tmp_path.iterdir() if p != out]) == inputs
    assert not (out / "manifest.json").exists()
    return line


def test_text_parts_are_joined_as_text(cli, tmp_path):
    parts = [chat([{"type": "text", "text": f"Question {i}, "}, {"type": "text", "text": "in two parts."}],
                  [{"type": "text", "text": f"Answer {i}."}]) for i in range(30)]
    plain = [chat(f"Question {i}, in two parts.", f"Answer {i}.") for i in range(30)]
    write_jsonl(tmp_path / "parts.jsonl", parts)
    write_jsonl(tmp_path / "plain.jsonl", plain)
    a = prepare_ok(cli, tmp_path, tmp_path / "parts.jsonl", name="a")
    b = prepare_ok(cli, tmp_path, tmp_path / "plain.jsonl", name="b")
    shards = sorted(p.name for p in b.glob("*.bin"))
    assert shards and all((a / n).read_bytes() == (b / n).read_bytes() for n in shards)
    assert "Question 0, in two parts." in cli("inspect", a).out and "{'type'" not in cli("inspect", a).out


@pytest.mark.parametrize("part", [
    {"type": "image", "image": "cat.png"},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "audio", "audio": "a.wav"},
])
def test_a_part_that_is_not_text_is_refused_naming_the_record(cli, tmp_path, part):
    rows = [chat("q", "a")] * 5 + [chat([{"type": "text", "text": "look:"}, part], "a")] + [chat("q", "a")] * 5
    write_jsonl(tmp_path / "mm.jsonl", rows)
    line = prepare_refused(cli, tmp_path, tmp_path / "mm.jsonl")
    assert f"{tmp_path / 'mm.jsonl'}:6: message 0: content part 1 is of type \"{part['type']}\"" in line


@pytest.mark.parametrize("content, says", [
    ({"text": "hi"}, 'content is an object ({"text": "hi"})'),
    (42, "content is a number (42)"),
    (True, "content is a boolean (true)"),
    ([{"text": "no type"}], 'content part 0 is an object ({"text": "no type"})'),
    (["bare string"], 'content part 0 is a string ("bare string")'),
])
def test_other_content_is_refused_naming_the_record(cli, tmp_path, content, says):
    rows = [chat("q", "a")] * 3 + [chat("q", content)]
    (tmp_path / "odd.json").write_text(json.dumps(rows, indent=2))  # a JSON document: records, not lines
    line = prepare_refused(cli, tmp_path, tmp_path / "odd.json")
    assert f"{tmp_path / 'odd.json'}: record 3: message 1: {says}" in line


# ---------------------------------------------------------------------------------------------
# Chat templates that fail


TEMPLATES = {
    "include": ("{% include 'other.jinja' %}", "the template failed: TypeError: no loader for this environment"),
    "division": ("{% for m in messages %}{{ m['content'] }}{{ 1 / 0 }}{% endfor %}",
                 "the template failed: ZeroDivisionError: division by zero"),
    "str + int": ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}",
                  'the template failed: TypeError: can only concatenate str (not "int") to str'),
    "undefined filter": ("{{ messages | shout }}", "not a valid Jinja template: line 1: No filter named 'shout'"),
    "syntax": ("{% for m in messages %}\n{{ m['content'] }}\n{% endfor\n",
               "not a valid Jinja template: line 3: unexpected end of template"),
    "undefined": ("{{ nothing.at_all }}", "the template failed: 'nothing' is undefined"),
    "sandbox": ("{{ messages.__class__.__subclasses__() }}", "the template failed:"),
    "raise_exception": ("{{ raise_exception('roles must alternate') }}", "the template failed: roles must alternate"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_template_error_is_one_line_naming_the_template(cli, tmp_path, name):
    text, says = TEMPLATES[name]
    (tmp_path / "t.jinja").write_text(text)
    write_jsonl(tmp_path / "c.jsonl", [chat("q", "a")] * 5)
    line = prepare_refused(cli, tmp_path, tmp_path / "c.jsonl", f"--data.chat_template={tmp_path / 't.jinja'}")
    assert f"--data.chat_template={tmp_path / 't.jinja'}: {says}" in line


def test_a_template_failing_on_one_record_names_the_template_and_the_record(cli, tmp_path):
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} "
                                      "({{ 100 // (m['content'] | length) }}%){{ eos_token }}{% endfor %}")
    write_jsonl(tmp_path / "c.jsonl", [chat("q", "a")] * 4 + [chat("", "a")] + [chat("q", "a")])
    line = prepare_refused(cli, tmp_path, tmp_path / "c.jsonl", f"--data.chat_template={tmp_path / 't.jinja'}")
    assert f"--data.chat_template={tmp_path / 't.jinja'}: the template failed: ZeroDivisionError" in line
    assert f"(on {tmp_path / 'c.jsonl'}:5)" in line


def test_the_tokenizers_own_broken_template_is_named_so(cli, tmp_path, hf_gpt2):
    import copy

    tok = copy.deepcopy(hf_gpt2)
    tok.chat_template = "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"
    tok.save_pretrained(tmp_path / "tok")
    write_jsonl(tmp_path / "c.jsonl", [chat("q", "a")] * 5)
    line = prepare_refused(cli, tmp_path, tmp_path / "c.jsonl", f"--data.tokenizer={tmp_path / 'tok'}")
    assert f"the tokenizer's chat template (--data.tokenizer={tmp_path / 'tok'}): the template failed: TypeError" in line


# ---------------------------------------------------------------------------------------------
# .json shapes and JSON Lines


RECORDS = [{"id": i, "text": f"document {i}", "tags": ["a", "b"]} for i in range(5)]
TEXTS = [r["text"] for r in RECORDS]


def write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("indent", [None, 0, 2])
@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("name", ["d.json", "d.json.gz"])
def test_a_json_document_is_read_whole_whatever_its_indent(tmp_path, indent, wrapped, name):
    doc = {"version": 1, "data": RECORDS} if wrapped else RECORDS
    path = write(tmp_path / name, json.dumps(doc, indent=indent))
    assert list(documents(SourceSpec(str(path)))) == TEXTS


@pytest.mark.parametrize("name", ["lines.json", "lines.json.gz"])
def test_json_lines_in_a_json_file_are_read_as_lines(tmp_path, name):
    path = write(tmp_path / name, "\n" + "\n\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert list(documents(SourceSpec(str(path)))) == TEXTS


@pytest.mark.parametrize("indent", [None, 0, 2])
def test_a_json_file_of_one_record_is_that_record(tmp_path, indent):
    one = write(tmp_path / "one.json", json.dumps(RECORDS[0], indent=indent))
    assert list(documents(SourceSpec(str(one)))) == TEXTS[:1]
    conversation = write(tmp_path / "chat.json", json.dumps(chat("q", "a"), indent=indent))
    assert list(records(SourceSpec(str(conversation)))) == [chat("q", "a")]  # its messages are not records


def test_json_broken_after_a_first_object_line_names_the_line(cli, tmp_path):
    path = write(tmp_path / "x.json", "\n".join(json.dumps(r) for r in RECORDS[:3]) + '\n{"text": \n')
    assert f"{path}:4: not valid JSON" in prepare_refused(cli, tmp_path, path)
    path = write(tmp_path / "y.json", json.dumps(RECORDS, indent=0).replace('"document 3"', "document 3"))
    assert f"{path}:" in prepare_refused(cli, tmp_path, path)


def test_an_indent_0_json_prepares_like_its_jsonl(cli, tmp_path):
    records_ = [{"text": t} for t in ["The first document is here. " * 20, "And another one. " * 30]]
    write(tmp_path / "doc.json", json.dumps(records_, indent=0))
    write_jsonl(tmp_path / "doc.jsonl", records_)
    a = prepare_ok(cli, tmp_path, tmp_path / "doc.json", name="a")
    b = prepare_ok(cli, tmp_path, tmp_path / "doc.jsonl", name="b")
    assert (a / "train-00000.bin").read_bytes() == (b / "train-00000.bin").read_bytes()


# ---------------------------------------------------------------------------------------------
# Invalid UTF-8


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz", "bad.txt", "bad.json"])
def test_invalid_utf8_names_the_file_line_and_byte(cli, tmp_path, name):
    if name.endswith(".json"):
        lines = json.dumps([{"text": f"line {i} " + "é" * 5} for i in range(10)], indent=0,
                           ensure_ascii=False).encode().split(b"\n")
    else:
        lines = [(json.dumps({"text": f"line {i} " + "é" * 5}, ensure_ascii=False) if ".jsonl" in name
                  else f"line {i} " + "é" * 5).encode() for i in range(3000)]  # past the reader's first buffer
    bad_line = max(i for i, x in enumerate(lines, 1) if "é".encode() in x)  # 1-based: the damaged line
    at = lines[bad_line - 1].index("é".encode()) + 1  # inside a two-byte character: its continuation byte
    lines[bad_line - 1] = lines[bad_line - 1][:at] + b"\xff" + lines[bad_line - 1][at + 1:]
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    offset = sum(len(x) + 1 for x in lines[:bad_line - 1]) + at - 1  # where the decoder sees the broken character
    args = ["--data.txt_mode=line"] if name.endswith(".txt") else []
    line = prepare_refused(cli, tmp_path, path, *args)
    assert f"{path}:{bad_line}: not valid UTF-8 at byte offset {offset}" in line


def test_generate_with_a_broken_model_template_is_one_line(cli, tmp_path, dropout_gpt2, hf_gpt2):
    import copy

    model = shutil.copytree(dropout_gpt2, tmp_path / "model")
    tok = copy.deepcopy(hf_gpt2)
    tok.chat_template = "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"
    tok.save_pretrained(model)
    before = snapshot(model)
    line = refused(cli("generate", f"--model.name={model}", "--gen.chat=true", "--prompt", "hi",
                       "--gen.max_new_tokens=2"), "--gen.chat: the model's chat template failed",
                   'TypeError: can only concatenate str (not "int") to str')
    assert line.count("\n") == 0 and snapshot(model) == before
