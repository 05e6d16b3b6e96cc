"""Password hashing: a login for an account that does not exist costs what a real one does."""

from __future__ import annotations

import asyncio

from argon2 import extract_parameters
from hypothesis import given, settings
from hypothesis import strategies as st

from apix.config import AuthSettings
from apix.identity.passwords import Passwords


@settings(max_examples=10, deadline=None)
@given(
    time_cost=st.integers(2, 4),
    memory_kib=st.integers(19_456, 40_000),
    parallelism=st.integers(1, 4),
    password=st.text(max_size=64),
)
def test_the_stand_in_for_a_missing_account_has_a_real_hashs_cost_and_matches_nothing(
    time_cost: int, memory_kib: int, parallelism: int, password: str
) -> None:
    passwords = Passwords(
        AuthSettings(
            argon2_time_cost=time_cost,
            argon2_memory_kib=memory_kib,
            argon2_parallelism=parallelism,
        )
    )
    real = asyncio.run(passwords.hash(password))
    assert extract_parameters(passwords._dummy) == extract_parameters(real)
    assert asyncio.run(passwords.verify(None, password)) is False
    assert asyncio.run(passwords.verify(real, password)) is True
