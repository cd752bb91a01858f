"""Bundle loading is a trust boundary: a bundle directory may come from anywhere.

`load_bundle` refuses pickles (by name or by content), symbolic links, names in bundle.json that point outside
the bundle directory, and files whose sha256 differs from bundle.json; each refusal names the file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from survey_infer.bundle import list_shipped_bundles, load_bundle, sha256_file
from survey_infer.cli import main
from survey_infer.errors import BundleError
from tests.conftest import make_tiny_bundle, tree_snapshot


class _Detonator:
    """Unpickling this writes a file: the proof that nobody unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


@pytest.fixture()
def bundle(tmp_path) -> Path:
    return make_tiny_bundle(tmp_path / "bundle")


def _list_file(bundle_dir: Path, name: str, digest_of: Path | None = None) -> None:
    """Name ``name`` in bundle.json with the correct sha256 of ``digest_of`` (default: the file itself)."""
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    meta["files"][name] = sha256_file(digest_of or (bundle_dir / name))
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))


def test_the_tiny_and_shipped_bundles_load(bundle):
    assert load_bundle(bundle).id == "mass_to_light-tiny-v1"
    assert len(list_shipped_bundles()) >= 1  # every shipped bundle passes every check below


# ----------------------------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "state.pkl", "last.ckpt", "pytorch_model.bin"])
def test_a_listed_pickle_file_is_refused_by_its_name(bundle, name):
    torch.save({"w": torch.zeros(2)}, bundle / name)
    _list_file(bundle, name)  # correct sha256: the pickle itself is the problem
    with pytest.raises(BundleError, match=rf"file {name} has a pickle-format suffix .*never pickles"):
        load_bundle(bundle)


def test_weights_that_are_a_pickle_are_refused_and_never_unpickled(bundle, tmp_path):
    marker = tmp_path / "exploded"
    (bundle / "weights.safetensors").write_bytes(pickle.dumps({"w": _Detonator(marker)}, protocol=4))
    _list_file(bundle, "weights.safetensors")
    with pytest.raises(BundleError, match=r"file weights\.safetensors is a pickle"):
        load_bundle(bundle)
    assert not marker.exists()


def test_weights_that_are_a_torch_checkpoint_are_refused(bundle):
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)  # a zip archive holding data.pkl
    (bundle / "weights.safetensors").write_bytes(buffer.getvalue())
    _list_file(bundle, "weights.safetensors")
    with pytest.raises(BundleError, match=r"weights\.safetensors is a pickle \(or a PyTorch checkpoint"):
        load_bundle(bundle)


def test_a_pickle_under_an_innocent_name_is_refused(bundle):
    (bundle / "extra.json").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    _list_file(bundle, "extra.json")
    with pytest.raises(BundleError, match=r"file extra\.json is a pickle"):
        load_bundle(bundle)


def test_weights_that_are_not_safetensors_are_refused(bundle):
    (bundle / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    _list_file(bundle, "weights.safetensors")
    with pytest.raises(BundleError, match=r"weights\.safetensors is not a safetensors file"):
        load_bundle(bundle)


# ------------------------------------------------------------------------------------------------ symlinks


def test_a_weights_file_that_is_a_symlink_is_refused(bundle, tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(bundle / "weights.safetensors", elsewhere)
    (bundle / "weights.safetensors").symlink_to(elsewhere)  # same bytes, same sha256: only the link is wrong
    with pytest.raises(BundleError, match=r"file weights\.safetensors listed in bundle\.json is .*symbolic link"):
        load_bundle(bundle)


def test_a_file_under_a_symlinked_directory_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside_engines"
    outside.mkdir()
    (outside / "plan.bin.trt").write_bytes(b"not a plan")
    (bundle / "engines").symlink_to(outside, target_is_directory=True)
    _list_file(bundle, "engines/plan.bin.trt")
    with pytest.raises(BundleError, match=r"file engines/plan\.bin\.trt .*symbolic link .*engines ->"):
        load_bundle(bundle)


def test_a_bundle_json_that_is_a_symlink_is_refused(bundle, tmp_path):
    real = tmp_path / "bundle.json"
    shutil.move(bundle / "bundle.json", real)
    (bundle / "bundle.json").symlink_to(real)
    with pytest.raises(BundleError, match=r"bundle\.json is a symbolic link"):
        load_bundle(bundle)


# ------------------------------------------------------------------------------- paths outside the bundle


@pytest.mark.parametrize("name", ["../secret.onnx", "sub/../../secret.onnx", "ABSOLUTE"])
def test_names_outside_the_bundle_directory_are_refused(bundle, tmp_path, name):
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(b"outside the bundle")
    (bundle / "sub").mkdir()
    name = str(secret) if name == "ABSOLUTE" else name
    _list_file(bundle, name, digest_of=secret)  # the right sha256 of a file that does exist out there
    with pytest.raises(BundleError, match=r"names file .* outside the bundle directory"):
        load_bundle(bundle)


def test_names_that_are_not_strings_or_files_is_not_a_dict_are_refused(bundle):
    meta = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**meta, "files": ["weights.safetensors"]}))
    with pytest.raises(BundleError, match="'files' must map file names to sha256"):
        load_bundle(bundle)
    (bundle / "bundle.json").write_text(json.dumps({**meta, "files": {**meta["files"], "": "0" * 64}}))
    with pytest.raises(BundleError, match="names file ''; a relative path was expected"):
        load_bundle(bundle)


# ------------------------------------------------------------------------------------------------ sha256


def test_a_file_whose_sha256_differs_is_refused(bundle):
    weights = bundle / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"file weights\.safetensors has sha256 [0-9a-f]{16}\.\.\., bundle\.json "
                                          r"says [0-9a-f]{16}\.\.\. \(tampered with"):  # fmt: skip
        load_bundle(bundle)


def test_a_refused_bundle_refuses_the_run_and_writes_nothing(bundle, small_store, tmp_path, capsys):
    os.remove(bundle / "weights.safetensors")
    torch.save({"w": torch.zeros(2)}, bundle / "weights.safetensors")
    _list_file(bundle, "weights.safetensors")
    out = tmp_path / "out"
    code = main(["run", "mass_to_light", "--input", str(small_store), "--output", str(out), "--bundle", str(bundle),
                 "--engine", "torch", "--no-progress", "--in-process"])  # fmt: skip
    assert code == 2
    assert "refused: bundle" in capsys.readouterr().err
    assert tree_snapshot(out) == {}
