"""The space refusal before a fetch names the headroom it keeps (issue 22, item 6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from weightship.cli import _common
from weightship.cli import app as app_module
from weightship.fetch import engine


def test_space_refusal_names_the_headroom_and_json_gives_both_numbers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # More free space than the files need, less than the files plus the headroom: the message
    # must not read as a contradiction ("need N bytes, M free" with M > N).
    from weightship.fetch import build_request
    from weightship.fetch.request import make_sources

    request = build_request("weightship-tiny")
    need = sum(f.size or 0 for f in engine._plan(make_sources(request), request).files)
    free = need + (1 << 20)
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    _common._state.json = _common._state.quiet = _common._state.emitted = False
    code = _common.run(app_module.app, ["--json", "fetch", "weightship-tiny", "--to", str(tmp_path / "d")])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert f"need {need:,} bytes plus 64 MiB headroom, {free:,} free" in " ".join(err.split()), err
    body = json.loads(out)
    assert body["details"] == {"needed_bytes": need, "headroom_bytes": 64 << 20, "free_bytes": free}
    assert "headroom" in body["error"]
    assert not (tmp_path / "d" / "model.safetensors").exists()
