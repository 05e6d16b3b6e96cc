"""The signing-key folder: each file is parsed once per version of it."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from apix.identity.keys import KeyRing, generate


def test_a_key_file_replaced_under_the_same_name_is_read_anew(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    first = generate(folder)
    ring = KeyRing(folder)
    ring.load(create_if_empty=False)
    assert ring.current.public_jwk()["n"] == first.public_jwk()["n"]

    # Another key written over the file (as a restore from backup would), same name.
    other = generate(tmp_path / "other")
    (folder / f"{first.kid}.pem").write_bytes(
        (tmp_path / "other" / f"{other.kid}.pem").read_bytes()
    )
    ring.load(create_if_empty=False)
    assert ring.current.kid == first.kid
    assert ring.current.public_jwk()["n"] == other.public_jwk()["n"]


def test_a_file_that_is_not_an_rsa_key_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "ec.pem").write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(RuntimeError, match="is not an RSA private key"):
        KeyRing(folder).load(create_if_empty=False)
    (folder / "ec.pem").write_text("not a key")
    with pytest.raises(ValueError, match="Unable to load PEM"):
        KeyRing(folder).load(create_if_empty=False)


def _first_key(folder: str, start: Any) -> str:
    start.wait()  # every process reads the empty folder at the same moment
    ring = KeyRing(Path(folder))
    ring.load(create_if_empty=True)
    return ring.current.kid


def test_processes_starting_together_on_an_empty_folder_make_one_key(tmp_path: Path) -> None:
    """`apix serve --workers 4` in development, on a fresh data folder: had each worker made
    a key of its own, a token signed by one would be refused by the others ("unknown signing
    key") until they reloaded the folder."""
    folder = tmp_path / "keys"
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Barrier(4)
        with ProcessPoolExecutor(4, mp_context=context) as pool:
            kids = list(pool.map(_first_key, [str(folder)] * 4, [start] * 4))
    assert len(set(kids)) == 1, kids
    assert [p.name for p in folder.glob("*.pem")] == [f"{kids[0]}.pem"]
    assert not list(folder.glob(".*.tmp"))  # written aside, then renamed
