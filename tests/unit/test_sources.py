"""Document sources: local formats (gzip too) as files, folders and globs; text extraction; pydoc."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distclm.data import sources
from distclm.data.sources import SourceSpec, documents, extract_text
from distclm.errors import UserError
from tests.support.data import pydoc_texts, write_jsonl

RECORDS = [{"id": i, "text": f"document number {i}", "meta": {"n": i}} for i in range(6)]
TEXTS = [r["text"] for r in RECORDS]


def docs(source, **kw) -> list[str]:
    return list(documents(SourceSpec(str(source), **kw)))


def test_jsonl_and_gzip(tmp_path):
    assert docs(write_jsonl(tmp_path / "a.jsonl", RECORDS)) == TEXTS
    assert docs(write_jsonl(tmp_path / "a.jsonl.gz", RECORDS)) == TEXTS
    with gzip.open(tmp_path / "a.jsonl.gz", "rb") as fh:  # really compressed, not a renamed text file
        assert fh.read(1) == b"{"


def test_json_shapes(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(RECORDS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": RECORDS}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    with gzip.open(tmp_path / "list.json.gz", "wt") as fh:
        fh.write(json.dumps(RECORDS))
    for name in ("list.json", "wrapped.json", "lines.json", "list.json.gz"):
        assert docs(tmp_path / name) == TEXTS, name


def test_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "a.parquet", row_group_size=2)
    assert docs(tmp_path / "a.parquet") == TEXTS
    assert docs(tmp_path / "a.parquet", text_field="meta.n") == [str(i) for i in range(6)]


def test_txt_modes(tmp_path):
    body = "first line\nsecond line\n\n\nthird para line one\nline two\n\n   \nlast\n"
    (tmp_path / "a.txt").write_text(body)
    assert docs(tmp_path / "a.txt", txt_mode="file") == [body]
    assert docs(tmp_path / "a.txt", txt_mode="line") == ["first line", "second line", "third para line one",
                                                         "line two", "last"]
    assert docs(tmp_path / "a.txt", txt_mode="paragraph") == ["first line\nsecond line",
                                                              "third para line one\nline two", "last"]
    with gzip.open(tmp_path / "b.txt.gz", "wt") as fh:
        fh.write(body)
    assert docs(tmp_path / "b.txt.gz", txt_mode="line") == docs(tmp_path / "a.txt", txt_mode="line")


def test_folder_and_glob_are_sorted_and_filtered(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "b.jsonl", RECORDS[3:])
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:3])
    (tmp_path / "sub" / "c.txt").write_text("from the txt file")
    (tmp_path / "notes.md").write_text("ignored: not a supported extension")
    assert docs(tmp_path) == TEXTS + ["from the txt file"]
    assert docs(tmp_path / "*.jsonl") == TEXTS
    assert docs(f"{tmp_path}/**/*.txt") == ["from the txt file"]


def test_max_docs_takes_the_first_n_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:3])
    write_jsonl(tmp_path / "b.jsonl", RECORDS[3:])
    assert docs(tmp_path, max_docs=4) == TEXTS[:4]
    assert docs(tmp_path, max_docs=100) == TEXTS


def test_dotted_field_lists_joined():
    rec = {"q_id": "x", "answers": {"a_id": ["1", "2"], "text": ["First answer.", "Second one."], "score": [3, 1]}}
    assert extract_text(rec, "answers.text", " ") == "First answer. Second one."
    assert extract_text(rec, "answers.text", "\n\n") == "First answer.\n\nSecond one."
    # A list of records is mapped over, then joined.
    rec2 = {"answers": [{"text": "a"}, {"text": "b"}, {"text": None}]}
    assert extract_text(rec2, "answers.text", "|") == "a|b|"
    assert extract_text({"n": 5}, "n", " ") == "5"


def test_missing_field_lists_the_fields_there(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "x", "title": "y"}])
    with pytest.raises(UserError) as exc:
        docs(tmp_path / "a.jsonl")
    msg = str(exc.value)
    assert "--data.text_field=text" in msg and "document 0" in msg and "fields there: body, title" in msg
    with pytest.raises(UserError, match=r"field 'txt' not found in answers; fields there: text"):
        extract_text({"answers": {"text": ["a"]}}, "answers.txt", " ")


def test_pydoc_is_the_sorted_topics():
    texts = docs("pydoc")
    assert texts == pydoc_texts()
    assert len(texts) > 50 and sum(map(len, texts)) > 300_000


@pytest.mark.parametrize("source, local", [
    ("pydoc", False), ("eli5_category", False), ("user/dataset", False),
    ("./data", True), ("/abs/x", True), ("data/*.jsonl", True), ("corpus.jsonl.gz", True),
])
def test_is_local(source, local):
    assert sources.is_local_source(source) is local


def test_local_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        sources.local_files(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="the pattern matches no file"):
        sources.local_files(str(tmp_path / "*.parquet"))
    with pytest.raises(UserError, match="the folder has no"):
        sources.local_files(str(tmp_path))
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(UserError, match="a.csv: unsupported file type"):
        sources.local_files(str(tmp_path / "a.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        docs(tmp_path / "bad.jsonl")
