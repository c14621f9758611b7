"""Named bundles of settings for `--preset=NAME` (defaults < preset < --config file < flags)."""

from __future__ import annotations

from typing import Any

# Named bundles of fields. Later layers (file, flags) override them.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The embedded offline default: Python's own pydoc topics, a tiny random-init GPT-2.
    # Learns in ~2 minutes on 2 CPU cores: a random 7 M-parameter model needs lr 1e-3, not 2e-5.
    "demo": {
        "data": {"source": "pydoc", "dir": "data/pydoc", "block_size": 128, "val_fraction": 0.1},
        "model": {"name": "gpt2-tiny"},
        "train": {"strategy": "zero2", "lr": 1e-3, "epochs": 1, "warmup_steps": 5, "micro_batch_size": 8},
        "eval": {"batch_size": 16},
        "gen": {"prompt": "The with statement", "max_new_tokens": 40},
        "run": {"dir": "runs/demo"},
    },
    # Chat fine-tuning, offline: the shipped user/assistant exchanges about Python (distclm/assets/pydoc_chat.jsonl.gz),
    # loss on the answers only, whole samples packed into 256-token blocks; the sample is an answer to a question.
    "chat-demo": {
        "data": {"source": "pydoc-chat", "dir": "data/pydoc-chat", "block_size": 256, "val_fraction": 0.1},
        "model": {"name": "gpt2-tiny"},
        "train": {"strategy": "ddp", "lr": 2e-3, "epochs": 3, "warmup_steps": 10, "micro_batch_size": 4},
        "eval": {"batch_size": 16},
        "gen": {"prompt": "What is a list in Python?", "max_new_tokens": 60, "chat": True},
        "run": {"dir": "runs/chat-demo"},
    },
    # The Hugging Face causal-LM tutorial, exactly: ELI5 answers, DistilGPT2, lr 2e-5, wd 0.01.
    # datasets >= 4 no longer runs eli5_category's loading script: its parquet conversion is read.
    "eli5-distilgpt2": {
        "data": {"source": "eli5_category", "revision": "refs/convert/parquet", "split": "train",
                 "max_docs": 5000, "text_field": "answers.text", "join_with": " ",
                 "val_fraction": 0.2, "block_size": 128, "dir": "data/eli5"},
        "model": {"name": "distilgpt2"},
        "train": {"lr": 2e-5, "weight_decay": 0.01, "epochs": 3, "micro_batch_size": 8},
        "eval": {"batch_size": 8, "every_steps": 0},
        "gen": {"prompt": "Somatic hypermutation allows the immune system to"},
        "run": {"dir": "runs/eli5-distilgpt2"},
    },
}
