"""Model bundles: a directory with bundle.json, weights.safetensors and model.onnx, each file sha256-checked.

Loading never unpickles anything: weights come from safetensors, the architecture from a registry by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from survey_infer.errors import BundleError

BUNDLE_FORMAT = 1
BUNDLE_JSON = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"
FEATURES_OUTPUT = "features"  # the engine output that carries the penultimate layer (the trust score's input)
TRUST_KEY = "trust"  # bundle.json section describing the trust file (survey_infer.trust)
REQUIRED_KEYS = ("bundle_format", "id", "task", "architecture", "input_spec", "output_spec", "files")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, document: dict[str, Any]) -> None:
    """Write JSON to a temp file beside ``path`` and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; records and bundles are for every user to read
    os.replace(tmp, path)


@dataclass(frozen=True)
class Bundle:
    """A verified model bundle."""

    path: Path
    meta: dict[str, Any]

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def task(self) -> str:
        return self.meta["task"]

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.meta["input_spec"]

    @property
    def output_spec(self) -> dict[str, Any]:
        return self.meta["output_spec"]

    @property
    def onnx_path(self) -> Path | None:
        return self.path / ONNX_FILE if ONNX_FILE in self.meta["files"] else None

    def sha256(self) -> str:
        """sha256 of bundle.json, which itself pins the sha256 of every other file."""
        return sha256_file(self.path / BUNDLE_JSON)

    def build_torch_model(self):
        """The bundle's network in eval mode with its safetensors weights (strictly matched)."""
        from safetensors.torch import load_file

        from survey_infer.models import build_model

        arch = self.meta["architecture"]
        try:
            model = build_model(arch["name"], **arch.get("kwargs", {}))
        except KeyError as exc:
            raise BundleError(f"bundle {self.path}: {exc.args[0]}") from exc
        state = load_file(str(self.path / WEIGHTS_FILE))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"bundle {self.path}: {WEIGHTS_FILE} does not match architecture {arch['name']}: {exc}") from exc
        if self.emits_features:  # the penultimate layer as an extra output, last (issue 12: the trust score)
            if not hasattr(model, "emit_features"):
                raise BundleError(f"bundle {self.path}: engine_io.outputs names {FEATURES_OUTPUT!r}, but architecture "
                                  f"{arch['name']} cannot emit its features")  # fmt: skip
            model.emit_features = True
        return model.eval()

    @property
    def emits_features(self) -> bool:
        """Whether the engines return the penultimate layer as output ``features`` (the last of engine_io)."""
        outputs = list(self.meta.get("engine_io", {}).get("outputs", []))
        if FEATURES_OUTPUT in outputs and outputs[-1] != FEATURES_OUTPUT:
            raise BundleError(f"bundle {self.path}: engine_io.outputs {outputs}: {FEATURES_OUTPUT!r} must come last")
        return FEATURES_OUTPUT in outputs


PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".bin", ".dill")  # formats that unpickle


def _bundle_file(bundle_dir: Path, name: Any) -> Path:
    """The path of a file ``bundle.json`` names, refused unless it is a regular file inside the bundle directory.

    Names are relative POSIX paths without ``..``; no part of the path may be a symbolic link (a link could
    point anywhere, and its target could change after the sha256 check).
    """
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise BundleError(f"bundle {bundle_dir}: {BUNDLE_JSON} names file {name!r}; a relative path was expected")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts:
        raise BundleError(
            f"bundle {bundle_dir}: {BUNDLE_JSON} names file {name!r} outside the bundle directory; "
            "files must be relative paths inside it (no '..', not absolute)"
        )
    file_path = bundle_dir
    for part in parts:
        file_path = file_path / part
        if file_path.is_symlink():
            raise BundleError(
                f"bundle {bundle_dir}: file {name} listed in {BUNDLE_JSON} is (or lies under) a symbolic link "
                f"({file_path} -> {os.readlink(file_path)}); bundle files must be regular files inside the bundle"
            )
    if not file_path.is_file():
        raise BundleError(f"bundle {bundle_dir}: file {name} listed in {BUNDLE_JSON} is missing")
    if not file_path.resolve().is_relative_to(bundle_dir.resolve()):  # e.g. a hard-to-see mount trick
        raise BundleError(f"bundle {bundle_dir}: file {name} resolves outside the bundle directory")
    return file_path


def _refuse_pickle(bundle_dir: Path, name: str, file_path: Path) -> None:
    """Refuse a pickle (or a PyTorch zip checkpoint, which holds one) whatever its name; check the weights are
    safetensors. Loading a pickle runs arbitrary code, so a bundle may not even carry one."""
    if Path(name).suffix.lower() in PICKLE_SUFFIXES:
        raise BundleError(
            f"bundle {bundle_dir}: file {name} has a pickle-format suffix ({Path(name).suffix}); bundles hold "
            f"weights as {WEIGHTS_FILE} (safetensors), never pickles"
        )
    with open(file_path, "rb") as handle:
        head = handle.read(8)
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode of pickle protocols 2-5
    if head[:4] == b"PK\x03\x04":  # a zip archive: torch.save writes one with a data.pkl inside
        import zipfile

        try:
            with zipfile.ZipFile(file_path) as archive:
                is_pickle = any(n.endswith((".pkl", ".pickle")) for n in archive.namelist())
        except zipfile.BadZipFile:
            pass
    if is_pickle:
        raise BundleError(f"bundle {bundle_dir}: file {name} is a pickle (or a PyTorch checkpoint holding one); "
                          f"bundles hold weights as {WEIGHTS_FILE} (safetensors), never pickles")  # fmt: skip
    if name == WEIGHTS_FILE:
        _check_safetensors(bundle_dir, file_path)


def _check_safetensors(bundle_dir: Path, file_path: Path) -> None:
    """The safetensors layout: an 8-byte little-endian header length, then a JSON object of that length."""
    size = file_path.stat().st_size
    with open(file_path, "rb") as handle:
        head = handle.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = handle.read(n) if 0 < n <= min(size - 8, 100_000_000) else b""
    try:
        parsed = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise BundleError(f"bundle {bundle_dir}: {WEIGHTS_FILE} is not a safetensors file (no valid header)")


def load_bundle(path: str | Path, task: str | None = None) -> Bundle:
    """Open a bundle directory, check its format, task and the sha256 of every listed file.

    Refused (BundleError, naming the file): a bundle.json or listed file that is a symbolic link or lies under
    one, a listed name that is absolute or climbs out with ``..``, a pickle (by suffix or by content, PyTorch
    zip checkpoints included), weights that are not safetensors, and a file whose sha256 differs.
    """
    path = Path(path)
    meta_path = path / BUNDLE_JSON
    if meta_path.is_symlink():
        raise BundleError(f"bundle {path}: {BUNDLE_JSON} is a symbolic link; bundle files must be regular files")
    if not meta_path.is_file():
        raise BundleError(f"bundle {path}: {BUNDLE_JSON} not found")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {path}: {BUNDLE_JSON} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"bundle {path}: {BUNDLE_JSON} holds {type(meta).__name__}; a JSON object was expected")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise BundleError(f"bundle {path}: {BUNDLE_JSON} lacks keys {missing}")
    if meta["bundle_format"] != BUNDLE_FORMAT:
        raise BundleError(f"bundle {path}: bundle_format {meta['bundle_format']!r}; {BUNDLE_FORMAT} was expected")
    if task is not None and meta["task"] != task:
        raise BundleError(f"bundle {path} is for task {meta['task']!r}, not {task!r}")
    if not isinstance(meta["files"], dict):
        raise BundleError(f"bundle {path}: {BUNDLE_JSON} 'files' must map file names to sha256 digests")
    if WEIGHTS_FILE not in meta["files"]:
        raise BundleError(f"bundle {path}: {BUNDLE_JSON} lists no {WEIGHTS_FILE}")
    for name, expected in meta["files"].items():
        file_path = _bundle_file(path, name)
        _refuse_pickle(path, name, file_path)
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleError(
                f"bundle {path}: file {name} has sha256 {actual[:16]}..., {BUNDLE_JSON} says {str(expected)[:16]}... "
                "(tampered with or from another bundle)"
            )
    check_trust_listing(path, meta)
    return Bundle(path=path, meta=meta)


def check_trust_listing(bundle_dir: Path, meta: dict[str, Any]) -> None:
    """A ``trust`` section must name a file that ``files`` lists (so its sha256 is checked), and the engines
    must return the ``features`` it scores."""
    section = meta.get(TRUST_KEY)
    if section is None:
        return
    if not isinstance(section, dict) or section.get("file") not in meta["files"]:
        named = section.get("file") if isinstance(section, dict) else section
        raise BundleError(f"bundle {bundle_dir}: {BUNDLE_JSON} 'trust' must name a file listed in 'files' (got {named!r})")
    if FEATURES_OUTPUT not in meta.get("engine_io", {}).get("outputs", []):
        raise BundleError(f"bundle {bundle_dir}: {BUNDLE_JSON} has a 'trust' section but engine_io.outputs has no "
                          f"{FEATURES_OUTPUT!r}")  # fmt: skip


def record_file(bundle_dir: Path, name: str) -> None:
    """Add (or refresh) the sha256 of ``name`` in the bundle's bundle.json."""
    meta_path = Path(bundle_dir) / BUNDLE_JSON
    meta = json.loads(meta_path.read_text())
    meta["files"][name] = sha256_file(Path(bundle_dir) / name)
    write_json_atomic(meta_path, meta)


def shipped_bundles_dir() -> Path:
    return Path(str(resources.files("survey_infer") / "data" / "bundles"))


def list_shipped_bundles() -> list[Bundle]:
    """Every bundle that ships inside the package, verified."""
    root = shipped_bundles_dir()
    if not root.is_dir():
        return []
    return [load_bundle(p) for p in sorted(root.iterdir()) if (p / BUNDLE_JSON).is_file()]


def default_bundle_path(task: str) -> Path:
    """The shipped bundle a run uses when none is given: the newest version; among equals, the one that needs
    the fewest per-object inputs (it runs on any store), then the smallest cutouts (the fastest)."""
    root = shipped_bundles_dir()
    candidates = []
    for bundle_dir in sorted(root.glob(f"{task}-*")) if root.is_dir() else []:
        meta_path = bundle_dir / BUNDLE_JSON
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("task") == task:
                spec = meta.get("input_spec", {})
                n_meta = len(spec.get("meta", {}).get("columns", []))
                pixels = int(np.prod(spec.get("image", {}).get("shape", [0])))
                candidates.append((int(meta.get("version", 0)), -n_meta, -pixels, bundle_dir))
    if not candidates:
        raise BundleError(f"no bundle for task {task!r} ships with survey-infer; give one with --bundle")
    return max(candidates)[-1]
