"""The command line starts without importing what the command does not use (issue 19)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from weightship.cli.app import COMMANDS, load_command

# Libraries that cost tenths of a second to import, each used by a few commands only.
HEAVY = {"torch", "boto3", "botocore", "libtorrent", "fastapi", "starlette", "uvicorn", "huggingface_hub",
         "asyncssh", "numpy", "kubernetes", "safetensors", "transformers", "jsonschema", "yaml"}


def _imported_by(argv: list[str]) -> set[str]:
    """The top-level packages and weightship modules a fresh interpreter holds after running
    ``weightship ARGV``."""
    script = ("import json, sys\n"
              "from weightship.cli.app import app\n"
              "from weightship.cli._common import run\n"
              f"run(app, {argv!r})\n"
              "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    modules = json.loads(out.splitlines()[-1])
    return {m.split(".")[0] for m in modules} | {m for m in modules if m.startswith("weightship.")}


@pytest.mark.parametrize("argv", [["--version"], ["--help"]], ids=["version", "help"])
def test_version_and_help_import_no_command(argv: list[str]) -> None:
    """Before, ``weightship --version`` imported every command's module (starlette, uvicorn,
    numpy, jsonschema, yaml among them): 0.5 CPU-s, now 0.12 on this machine."""
    modules = _imported_by(argv)
    assert not modules & HEAVY, modules & HEAVY
    commands = {m for m in modules if m.startswith("weightship.cli.")}
    commands -= {"weightship.cli.app", "weightship.cli._common"}
    assert not commands, commands


def test_a_command_imports_its_own_module_only() -> None:
    modules = _imported_by(["nodes", "--help"])
    assert "weightship.cli.nodes" in modules
    assert not {"weightship.cli.fetch", "weightship.cli.serve", "weightship.cli.instance"} & modules
    assert not {"torch", "fastapi", "boto3", "libtorrent", "asyncssh"} & modules


def test_help_lists_every_command_and_each_one_loads() -> None:
    r = run_cli("--help")
    assert r.code == 0, r.stderr
    for name, (_, _, summary) in COMMANDS.items():
        assert f"{name}  " in r.stdout and summary in r.stdout, name
        command = load_command(name)
        assert command.name == name and command.help, name
    r = run_cli("no-such-command")
    assert r.code == 2 and "no-such-command" in r.stderr


def test_fetch_sources_and_a_trust_key_import_no_heavy_library(tmp_path: Path) -> None:
    """What every S3, HTTPS or Hub fetch imports before its first request: the source modules, the
    request, a ``--trust-key``. numpy (about 0.1 s) came in through the digests' package (its NaN
    scan, which a fetch never runs); the signature library, boto3 and huggingface_hub are imported
    only by the step that uses them (issue 22). A URI is never looked up in the catalog, so PyYAML
    is not imported; jsonschema comes with the first manifest read, not with the modules."""
    from weightship.signing import generate_key

    public = generate_key(tmp_path / "key.pem")
    script = ("import json, sys\n"
              "import weightship.fetch.s3, weightship.fetch.https, weightship.fetch.hf\n"
              "from weightship.fetch import build_request\n"
              "from weightship.signing import load_trust_key\n"
              "for uri in ('s3://models/tiny', 'https://example.org/m', 'hf://acme/m'):\n"
              "    build_request(uri)\n"
              f"load_trust_key({str(public)!r}, '--trust-key')\n"
              "print(json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    modules = {m.split(".")[0] for m in json.loads(out.splitlines()[-1])}
    assert "weightship" in modules and "cryptography" in modules
    heavy = {"numpy", "model_signing", "sigstore", "sigstore_models", "rekor_types", "boto3", "botocore",
             "huggingface_hub", "torch", "safetensors", "yaml", "jsonschema"}
    assert not modules & heavy, modules & heavy


def test_a_fetch_without_peers_does_not_load_the_swarm(tmp_path: Path) -> None:
    """Only a fetch given peers (or a listen address) imports the fleet swarm's modules."""
    code = ("import sys; from pathlib import Path; from weightship.fetch import build_request, fetch; "
            "fetch(build_request('weightship-tiny'), Path(sys.argv[1])); "
            "print(sorted(m for m in sys.modules if m.startswith('weightship.swarm')))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert (tmp_path / "m" / ".weightship" / "manifest.json").is_file()
