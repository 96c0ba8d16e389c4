"""Shared fixtures: generated checkpoints (cached per variant for the session)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import pytest

from testkit.checkpoints import ExampleOptions, write_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """``make_checkpoint(**ExampleOptions fields) -> Path``: a generated checkpoint folder.

    Folders are cached by their options for the whole session; treat them as read-only.
    """
    cache: dict[str, Path] = {}

    def make(**overrides) -> Path:
        opts = ExampleOptions(**overrides)
        key = repr(sorted(asdict(opts).items(), key=lambda kv: kv[0]))
        if key not in cache:
            root = tmp_path_factory.mktemp("ckpt")
            if not opts.embed_text_config and opts.base_dir is None:
                opts.base_dir = root / "base"
            cache[key] = write_checkpoint(root / "ckpt", opts)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def example_ckpt(make_checkpoint) -> Path:
    """The default example checkpoint (what ``mmconvert example`` writes)."""
    return make_checkpoint()
