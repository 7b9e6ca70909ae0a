"""JSON helpers without pymatgen: (gzip) JSON files, streamed top-level arrays,
and pymatgen `Structure` dicts (MSON) as numpy arrays."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ase.data import atomic_numbers as _SYMBOL_TO_Z

from jmp_jax.data.record import RecordError

_WS = " \t\n\r"


def load_json(path: Path, what: str) -> Any:
    """A ``.json`` or gzip-compressed ``.json(.gz)`` file (detected by content)."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}: cannot read {path} as JSON ({type(e).__name__}: {e})") from None


def iter_json_array(
    path: Path, what: str, chunk_chars: int = 1 << 24, max_element_chars: int = 1 << 30
) -> Iterator[Any]:
    """The elements of a top-level JSON array, decoded one at a time (memory bounded by
    the largest element). A malformed file raises ValueError naming it."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    decoder = json.JSONDecoder()
    try:
        fh = opener(path, "rt", encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{what}: cannot open {path} ({e})") from None
    with fh:
        buf, pos, eof, consumed = "", 0, False, 0

        def fill(min_extra: int = 1) -> bool:
            nonlocal buf, pos, eof, consumed
            if eof:
                return False
            text = fh.read(max(chunk_chars, min_extra))
            consumed += pos
            buf, pos = buf[pos:] + text, 0
            if not text:
                eof = True
            return bool(text)

        def next_char() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not fill():
                    return ""

        def error(msg: str) -> ValueError:
            return ValueError(
                f"{what}: {path} is not a valid JSON array: {msg} (near character {consumed + pos})"
            )

        try:
            if next_char() != "[":
                raise error("it does not start with '['")
            pos += 1
            if next_char() == "]":
                return
            while True:
                next_char()
                while True:
                    try:
                        obj, end = decoder.raw_decode(buf, pos)
                    except json.JSONDecodeError as e:
                        # the element may continue past the buffer: read more (bounded)
                        if len(buf) - pos < max_element_chars and fill(len(buf)):
                            continue
                        raise error(e.msg) from None
                    if end == len(buf) and not eof and fill(len(buf)):
                        continue  # a scalar may have been cut at the buffer end: re-decode
                    break
                pos = end
                yield obj
                c = next_char()
                if c == ",":
                    pos += 1
                elif c == "]":
                    return
                else:
                    raise error(f"expected ',' or ']', found {c!r}" if c else "unexpected end of file")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what}: {path} is not UTF-8 text ({e})") from None
        except (OSError, EOFError) as e:
            raise ValueError(f"{what}: cannot read {path} ({type(e).__name__}: {e})") from None


def element_number(symbol: Any) -> int | None:
    if isinstance(symbol, str):
        z = _SYMBOL_TO_Z.get(symbol)
        return int(z) if z is not None and z > 0 else None
    return None


def site_number(rid: str, site: dict, use_label: bool) -> int:
    """Atomic number of a pymatgen site dict.

    ``use_label`` (QMOF, as JMP): the site ``label`` is the element symbol; a
    label that is not a symbol falls back to the single species. Otherwise (as
    pymatgen's ``site.specie.number``): the single fully occupied species.
    """
    if use_label:
        z = element_number(site.get("label"))
        if z is not None:
            return z
    species = site.get("species")
    if not isinstance(species, list) or not species:
        raise RecordError(rid, f"site without species: {str(site)[:120]}")
    if len(species) != 1:
        names = [s.get("element") for s in species if isinstance(s, dict)]
        raise RecordError(rid, f"disordered site with species {names}; only ordered structures are supported")
    sp = species[0]
    element = sp.get("element") if isinstance(sp, dict) else None
    z = element_number(element)
    if z is None:
        raise RecordError(rid, f"unknown element {element!r} (label {site.get('label')!r})")
    occu = sp.get("occu", 1)
    if not isinstance(occu, (int, float)) or abs(float(occu) - 1.0) > 1e-8:
        raise RecordError(rid, f"partially occupied site ({element} occupancy {occu})")
    return z


def lattice_matrix(rid: str, structure: dict) -> np.ndarray:
    lattice = structure.get("lattice") if isinstance(structure, dict) else None
    matrix = lattice.get("matrix") if isinstance(lattice, dict) else None
    if matrix is None:
        raise RecordError(rid, "structure has no lattice.matrix")
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3):
        raise RecordError(rid, f"lattice.matrix has shape {m.shape}, expected (3, 3)")
    return m


def structure_arrays(rid: str, structure: Any, coords: str, use_label: bool = False):
    """(atomic numbers [N], Cartesian positions [N, 3] Å (float64), cell [3, 3]) of a
    pymatgen Structure dict.

    ``coords="abc"``: positions from the fractional coordinates, site by site
    ``np.dot(abc, matrix)`` (what ``Structure.from_dict(...)[i].coords`` gives);
    ``coords="xyz"``: the stored Cartesian ``xyz`` (QMOF, as JMP reads it).
    """
    if not isinstance(structure, dict):
        raise RecordError(rid, f"structure is a {type(structure).__name__}, not a dict")
    matrix = lattice_matrix(rid, structure)
    sites = structure.get("sites")
    if not isinstance(sites, list) or not sites:
        raise RecordError(rid, "structure has no sites")
    numbers = np.empty(len(sites), np.int64)
    positions = np.empty((len(sites), 3), np.float64)
    for i, site in enumerate(sites):
        if not isinstance(site, dict):
            raise RecordError(rid, f"site {i} is not a dict")
        numbers[i] = site_number(rid, site, use_label)
        value = site.get(coords)
        try:
            v = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            v = None
        if v is None or v.shape != (3,):
            raise RecordError(rid, f"site {i} has no valid {coords!r} coordinates ({value!r})")
        positions[i] = np.dot(v, matrix) if coords == "abc" else v
    return numbers, positions, matrix
