"""A weighted mixture of two prepared folders: each global batch in proportion, each folder evaluated on its own
and weighted, an exact resume onto another world size, and folders that cannot mix refused."""

from __future__ import annotations

import math

import pytest

from tests.support.runs import global_order, read_metrics, train


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The pydoc corpus cut two ways (64-token blocks): its first 30 documents, and all 79."""
    from tests.support.cli import run_cli

    root = tmp_path_factory.mktemp("mix")
    for name, extra in (("small", ["--data.max_docs=30"]), ("large", [])):
        run_cli("prepare", "--data.source=pydoc", f"--data.dir={root / name}", "--data.block_size=64",
                "--data.val_fraction=0.1", *extra, check=True)
    return root / "small", root / "large"


def test_mixture_trains_in_proportion_evaluates_each_folder_and_resumes_on_one_process(folders, tmp_path):
    small, large = folders
    args = (f"--data.weights=0.25,0.75", "--train.max_steps=6", "--train.micro_batch_size=4", "--train.seed=1",
            "--train.save_every=3", "--log.block_ids=true", "--eval.max_blocks=8", "--train.lr=1e-3")
    data = f"{small},{large}"
    train(2, tmp_path / "a", data, *args)
    order = global_order(tmp_path / "a", micro=4)
    offset = 0
    from tests.support.data import manifest_of

    offset = manifest_of(small)["splits"]["train"]["n_blocks"]
    assert [sum(i < offset for i in ids) for ids in order.values()] == [2] * 6  # 0.25 x 8 from the small folder
    ev = read_metrics(tmp_path / "a", "eval")[6]
    by = ev["eval_by_dir"]
    assert set(by) == {str(small), str(large)}
    assert abs(ev["eval_loss"] - (0.25 * by[str(small)]["loss"] + 0.75 * by[str(large)]["loss"])) < 1e-12
    assert abs(ev["eval_perplexity"] - math.exp(ev["eval_loss"])) < 1e-9 * ev["eval_perplexity"]
    assert ev["eval_tokens"] == sum(v["tokens"] for v in by.values())
    # Resume the 2-process step-3 checkpoint on 1 process (micro 8): the same blocks, the same losses.
    one = train(1, tmp_path / "b", data, *args[:2], "--train.micro_batch_size=8", *args[3:],
                f"--run.resume={tmp_path / 'a' / 'checkpoints' / 'step-3'}")
    assert "written by 2 process(es), now 1" in one.out
    resumed = global_order(tmp_path / "b", micro=4)
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: order[s] for s in (4, 5, 6)}
    la, lb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert max(abs(la[s]["loss"] - lb[s]["loss"]) for s in (4, 5, 6)) < 1e-5


def test_folders_that_cannot_mix_are_one_line_naming_the_folder(folders, tmp_path, cli):
    small, _ = folders
    other = tmp_path / "other"
    assert cli("prepare", "--data.source=pydoc", f"--data.dir={other}", "--data.block_size=32",
               "--data.max_docs=5").code == 0
    line = cli("train", f"--data.dir={small},{other}", "--model.name=gpt2-tiny", f"--run.dir={tmp_path / 'r'}"
               ).error_line()
    assert f"{other} has blocks of 32 tokens but {small} of 64" in line
    line = cli("train", f"--data.dir={small},{small}", "--data.weights=1", "--model.name=gpt2-tiny",
               f"--run.dir={tmp_path / 'r'}").error_line()
    assert "1 weight(s) for 2 folders" in line
