"""``weightship convert``: the original layout's .pth → safetensors, and hostile pickles refused."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_clean_failure, run_cli
from weightship.catalog import load_card
from weightship.catalog.tiny import original_tensors
from weightship.manifest import Manifest, create_for_directory

torch = pytest.importorskip("torch")


def test_convert_produces_the_same_tensors(tiny_original_dir: Path) -> None:
    from safetensors.torch import load_file

    card = load_card("weightship-tiny")
    expected = original_tensors(card.architecture, int(card.sources[0]["seed"]))
    converted = load_file(tiny_original_dir / "consolidated.safetensors")
    assert set(converted) == set(expected)
    for name, bits in expected.items():
        assert np.array_equal(converted[name].view(torch.int16).numpy().view("<u2"), bits), name
    entry = Manifest.load(tiny_original_dir).entry("consolidated.safetensors")
    assert entry is not None and entry.anchor == "convert"


def test_convert_cli_then_verify(tmp_path: Path) -> None:
    d = tmp_path / "orig"
    assert run_cli("fetch", "weightship-tiny", "--layout", "original", "--to", d).code == 0
    r = run_cli("convert", d, "--to", "safetensors")
    assert r.code == 0, r.stderr
    assert (d / "consolidated.safetensors").is_file()
    assert run_cli("verify", d, "--deep").code == 0


# ---- hostile pickles ---------------------------------------------------------------------------


class _System:
    """Unpickling this runs a shell command."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.cmd,))


class _Popen:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[object, tuple[list[str]]]:
        return (subprocess.Popen, (["sh", "-c", self.cmd],))


class _Eval:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (f"__import__('os').system({self.cmd!r})",))


def _torch_save(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _hostile(kind: str, cmd: str) -> bytes:
    if kind == "zip-os-system":  # torch.save format, the state dict's value runs a command
        return _torch_save({"tok_embeddings.weight": _System(cmd)})
    if kind == "zip-popen":
        return _torch_save({"layers.0.attention.wq.weight": _Popen(cmd)})
    if kind == "zip-eval":
        return _torch_save(_Eval(cmd))
    if kind == "legacy-pickle-reduce":  # a bare pickle, not a torch archive
        return pickle.dumps({"norm.weight": _System(cmd)}, protocol=2)
    if kind == "exec-global-protocol0":  # hand-written protocol-0 opcodes calling builtins.exec
        return b"cbuiltins\nexec\n(V__import__('os').system(" + repr(cmd).encode() + b")\ntR."
    if kind == "non-tensor-values":  # allowed by weights_only, but not a state dict of tensors
        return _torch_save({"norm.weight": [1, 2, 3], "cmd": cmd})
    raise AssertionError(kind)


HOSTILE_KINDS = ["zip-os-system", "zip-popen", "zip-eval", "legacy-pickle-reduce",
                 "exec-global-protocol0", "non-tensor-values"]


def _hostile_dir(tmp_path: Path, tiny_original_dir: Path, kind: str) -> tuple[Path, Path]:
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_original_dir / "params.json", d / "params.json")
    sentinel = tmp_path / "PWNED"
    (d / "consolidated.00.pth").write_bytes(_hostile(kind, f"touch {sentinel}"))
    return d, sentinel


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_pickle_is_refused_even_when_trusted(tmp_path: Path, tiny_original_dir: Path,
                                                     kind: str) -> None:
    d, sentinel = _hostile_dir(tmp_path, tiny_original_dir, kind)
    create_for_directory(d).write(d)  # the user vouches for these bytes: the digest matches
    r = run_cli("convert", d, "--to", "safetensors")
    assert_clean_failure(r)
    assert "consolidated.00.pth" in r.stderr
    assert not sentinel.exists(), "the pickle ran a command"
    assert not (d / "consolidated.safetensors").exists()


def test_untrusted_digest_is_refused_before_unpickling(tmp_path: Path, tiny_original_dir: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_original_dir, d)
    (d / "consolidated.safetensors").unlink()
    sentinel = tmp_path / "PWNED"
    # The manifest vouches for the real weights; the file on disk was swapped afterwards.
    (d / "consolidated.00.pth").write_bytes(_hostile("legacy-pickle-reduce", f"touch {sentinel}"))
    r = run_cli("convert", d, "--to", "safetensors")
    assert_clean_failure(r, 3)
    assert "mismatch" in r.stderr
    assert not sentinel.exists()


def test_unlisted_pth_is_refused(tmp_path: Path, tiny_original_dir: Path) -> None:
    d, sentinel = _hostile_dir(tmp_path, tiny_original_dir, "zip-os-system")
    create_for_directory(d).write(d)
    other = Manifest.load(d)
    other.files = [f for f in other.files if f.path != "consolidated.00.pth"]
    external = tmp_path / "trusted.json"
    external.write_text(json.dumps(other.to_dict()))
    r = run_cli("convert", d, "--manifest", external)
    assert_clean_failure(r, 3)
    assert "not listed in the trusted manifest" in r.stderr
    assert not sentinel.exists()


def test_the_pth_loaded_is_the_pth_checked(tmp_path: Path, tiny_original_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17, item 12: another writer of a shared cache swaps the .pth right after its digest
    was checked; what is unpickled must still be the checked file."""
    from safetensors.torch import load_file

    from weightship.verify import convert

    d = tmp_path / "m"
    shutil.copytree(tiny_original_dir, d)
    (d / "consolidated.safetensors").unlink()
    m = Manifest.load(d)
    m.files = [f for f in m.files if f.path != "consolidated.safetensors"]
    m.write(d)
    real = torch.load(d / "consolidated.00.pth", weights_only=True)
    swapped = tmp_path / "swapped.pth"
    torch.save({k: torch.zeros_like(v) for k, v in real.items()}, swapped)  # unchecked bytes
    load = convert._load_trusted_pth

    def swap_then_load(path: object, label: str) -> dict[str, object]:
        os.replace(swapped, d / "consolidated.00.pth")  # after the check, before the load
        return load(path, label)  # type: ignore[arg-type]

    monkeypatch.setattr(convert, "_load_trusted_pth", swap_then_load)
    convert.convert_directory(d)
    converted = load_file(d / "consolidated.safetensors")
    assert set(converted) == set(real)
    for name, tensor in real.items():
        assert torch.equal(converted[name], tensor), name
