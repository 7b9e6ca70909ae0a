"""The parity set shipped in tests/fixtures/parity (docs/parity.md#shipped-set).

It must materialise into exactly the original files (sha256 in manifest.json and
PROVENANCE.md), refuse a set that does not reproduce them, survive concurrent
builders, and give way to `$JMP_JAX_PARITY_DIR`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jmp_jax import parity

SHIPPED = parity.SHIPPED_DIR
MANIFEST = json.loads((SHIPPED / parity.MANIFEST).read_text())
REPO = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def materialised(tmp_path_factory) -> Path:
    return parity.materialize_shipped_set(cache_root=tmp_path_factory.mktemp("cache"))


def test_materialised_set_is_the_original_files(materialised):
    names = sorted(p.name for p in materialised.iterdir())
    assert names == sorted(MANIFEST["files"])
    for name, entry in MANIFEST["files"].items():
        assert _sha256(materialised / name) == entry["sha256"], name
        assert (materialised / name).stat().st_size == entry["size"], name
    # The checkpoint is the one file rebuilt rather than copied, and it is most of the bytes.
    rebuilt = [n for n, e in MANIFEST["files"].items() if e["shipped_as"] == "rebuild"]
    assert rebuilt == ["tiny_pretrain.ckpt"]
    assert MANIFEST["files"]["tiny_pretrain.ckpt"]["recipe_bytes"] > 0.9 * MANIFEST["files"]["tiny_pretrain.ckpt"]["size"]


def test_provenance_table_matches_manifest():
    text = (SHIPPED / "PROVENANCE.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| ([0-9a-f]{64}) \|", text, flags=re.M))
    assert rows == {name: entry["sha256"] for name, entry in MANIFEST["files"].items()}


def test_second_call_reuses_the_cache(materialised):
    again = parity.materialize_shipped_set(cache_root=materialised.parent)
    assert again == materialised
    assert not [p for p in materialised.parent.iterdir() if p.name.startswith(".parity-build-")]


def test_concurrent_builders_agree(tmp_path):
    root = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: parity.materialize_shipped_set(cache_root=root), range(4)))
    assert len(set(paths)) == 1
    assert [p.name for p in root.iterdir()] == [paths[0].name]  # no partial or temporary directory left
    assert _sha256(paths[0] / "tiny_pretrain.ckpt") == MANIFEST["files"]["tiny_pretrain.ckpt"]["sha256"]


def test_a_set_that_does_not_reproduce_its_sha256_is_refused(tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(SHIPPED, shipped)
    fills_path = shipped / "tiny_pretrain.ckpt.fills.json"
    fills = json.loads(fills_path.read_text())
    fills[0]["seed_name"] = "ema:" + fills[0]["seed_name"]  # right size, wrong numbers
    fills_path.write_text(json.dumps(fills))
    root = tmp_path / "cache"
    with pytest.raises(parity.ParityFixtureError, match="tiny_pretrain.ckpt.*sha256"):
        parity.materialize_shipped_set(shipped, cache_root=root)
    assert list(root.iterdir()) == []  # nothing half-built is left to be picked up later


def test_recipe_reproduces_a_stored_weight(materialised):
    """One checkpoint tensor read back through the zip, against the recipe (README of the set)."""
    fills = json.loads((SHIPPED / "tiny_pretrain.ckpt.fills.json").read_text())
    fill = next(f for f in fills if f["seed_name"] == "embedding.atom_embedding.weight")
    raw = (materialised / "tiny_pretrain.ckpt").read_bytes()
    stored = raw[fill["offset"] : fill["offset"] + fill["nbytes"]]
    assert stored == parity.recipe_array(fill["seed_name"], fill["shape"]).tobytes()
    assert fill["shape"][0] == 120


def test_parity_dir_prefers_the_environment(tmp_path, monkeypatch, materialised):
    """`$JMP_JAX_PARITY_DIR` wins, and a parity test runs on exactly the files found there."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(materialised / "tiny__water.npz", other / "tiny__water.npz")
    monkeypatch.setenv("JMP_JAX_PARITY_DIR", str(other))
    assert parity.parity_dir() == other
    assert parity.system_files() == [other / "tiny__water.npz"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
         "tests/graphs/test_parity.py::test_symmetrised_main_graph_and_id_swap"],
        cwd=REPO, env={**os.environ, "JMP_JAX_PARITY_DIR": str(other)},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASSED tests/graphs/test_parity.py::test_symmetrised_main_graph_and_id_swap[tiny__water.npz]" in result.stdout
    assert "1 passed" in result.stdout


def test_parity_dir_defaults_to_the_shipped_set(monkeypatch, tmp_path):
    monkeypatch.delenv("JMP_JAX_PARITY_DIR", raising=False)
    monkeypatch.setenv("JMP_JAX_CACHE_DIR", str(tmp_path))
    directory = parity.parity_dir()
    assert directory.parent == tmp_path
    assert {p.name for p in directory.iterdir()} == set(MANIFEST["files"])
