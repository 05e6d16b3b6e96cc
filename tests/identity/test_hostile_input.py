"""Hostile text in every text field of the auth and admin writes: stored verbatim or 422.

SQL fragments, 10 000-character strings, emoji, right-to-left overrides, combining marks,
control characters and NUL bytes go into each field. The contract for every one of them:

* accepted (2xx) and read back equal through a later GET, after the one documented
  normalisation (names are stripped of surrounding whitespace), or
* refused with 422 and the error model,

and never a 5xx. Where the schema makes the outcome predictable (length limits, NUL, slug
and email syntax) the test also checks that the right one of the two happened.
Each test collects every offending value before failing, so one run names them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import httpx
import hypothesis
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from pydantic import StringConstraints, TypeAdapter

from apix.config import AuthSettings, Settings
from apix.identity.runtime import IdentityRuntime
from tests.conftest import Servers, make_settings
from tests.identity.factories import (
    PASSWORD,
    Account,
    bearer,
    login,
    new_org_admin,
    new_super_admin,
    unique,
)

REGISTER = "/api/v1/auth/register"
LOGIN = "/api/v1/auth/login"
PROFILE = "/api/v1/auth/profile"
ORGANIZATION = "/api/v1/admin/organization"
INVITATIONS = "/api/v1/admin/invitations"
API_KEYS = "/api/v1/admin/api-keys"

HOSTILE: dict[str, str] = {
    "sql-drop": "'; DROP TABLE user_account; --",
    "sql-or": "' OR '1'='1' --",
    "sql-union": "x' UNION SELECT password_hash FROM user_account --",
    "long-10k": "A" * 10_000,
    "emoji": "\U0001f469\u200d\U0001f4bb \U0001f525 caf\u00e9 \U0001f1fa\U0001f1e6",
    "rtl": "\u202eevil\u202c \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627",
    "combining": "Z\u0324\u0354\u0367\u0311\u0343a\u0308\u0356\u032d\u0308\u0307l\u036e\u0312",
    "nul": "before\x00after",
    "control": "tab\there\r\nbell\x07 esc\x1b[31m del\x7f",
    "markup": "<script>alert(1)</script>{{7*7}}${7*7}",
    "json-operator": '{"$ne": null}',
    "invisible": "\u200b\ufeff\u2028x",
    "blank": " \t\u3000 ",
}

# Emails that look hostile yet are valid addresses: they must be kept exactly.
ODD_VALID_EMAILS = [
    "o'hara+tag@example.com",
    "'or'1'='1@example.com",
    "\u00fcn\u00efc\u00f8de@example.com",
]

# The one normalisation names get: surrounding whitespace stripped. Python's and Unicode's
# ideas of whitespace differ (U+001C..U+001F), so either reading of "strip" is accepted.
_UNICODE_STRIP = TypeAdapter(Annotated[str, StringConstraints(strip_whitespace=True)])


def stripped(value: str) -> set[str]:
    return {value.strip(), _UNICODE_STRIP.validate_python(value)}


def name_ok(value: str) -> bool | None:
    """Whether a name field (1..200 characters once stripped) must accept ``value``.

    None where either answer is fair: the two readings of "strip" disagree on whether the
    value is blank, or a short name is padded with whitespace beyond 200 characters and
    may be refused for its raw length.
    """
    if "\x00" in value:
        return False
    fits = {1 <= len(form) <= 200 for form in stripped(value)}
    if fits == {False}:
        return False
    return True if fits == {True} and len(value) <= 200 else None


def text_ok(max_length: int) -> Callable[[str], bool]:
    return lambda value: "\x00" not in value and len(value) <= max_length


def never(_value: str) -> bool:
    return False


def always_text(value: str) -> bool:
    return "\x00" not in value


@pytest.fixture
def settings(servers: Servers) -> Settings:
    """Login limits out of the way: these tests measure input handling, not the limiter."""
    return make_settings(
        servers,
        auth=AuthSettings(login_failures_per_account=10_000, login_failures_per_ip=10_000),
    )


class Problems:
    """Every value that broke the contract, reported together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def check(
        self,
        label: str,
        response: httpx.Response,
        *,
        ok_status: int,
        expect_ok: bool | None,
        refusals: tuple[int, ...] = (422,),
    ) -> bool:
        """True when ``response`` accepted the value (and that was allowed)."""
        status = response.status_code
        if status not in (ok_status, *refusals):
            self.items.append(f"{label}: unexpected {status} {response.text[:300]}")
            return False
        if status != ok_status:
            error = response.json().get("error", {})
            if set(error) != {"code", "message", "details"}:
                self.items.append(f"{label}: {status} without the error model: {response.text}")
            if expect_ok:
                self.items.append(f"{label}: valid value refused: {response.text[:300]}")
            return False
        if expect_ok is False:
            self.items.append(f"{label}: invalid value accepted: {response.text[:300]}")
        return True

    def equal(self, label: str, stored: object, expected: object) -> None:
        if stored != expected:
            self.items.append(f"{label}: stored {stored!r:.200} != sent {expected!r:.200}")

    def one_of(self, label: str, stored: object, allowed: set[str]) -> None:
        if stored not in allowed:
            self.items.append(f"{label}: stored {stored!r:.200} not in {sorted(allowed)!r:.300}")

    def assert_none(self) -> None:
        assert not self.items, "\n".join(self.items)


def _register_body(**fields: Any) -> dict[str, Any]:
    slug = unique("hostile")
    return {
        "email": f"{slug}@example.com",
        "password": PASSWORD,
        "name": "Hostile Tester",
        "organization_name": "Hostile Org",
        "organization_slug": slug,
        **fields,
    }


# --- register ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["name", "organization_name"])
async def test_register_names(client: httpx.AsyncClient, field: str) -> None:
    problems = Problems()
    for case, value in HOSTILE.items():
        body = _register_body(**{field: value})
        response = await client.post(REGISTER, json=body)
        if problems.check(case, response, ok_status=201, expect_ok=name_ok(value)):
            tokens = await login(client, body["email"])
            headers = {"Authorization": f"Bearer {tokens['access_token']}"}
            if field == "name":
                stored = (await client.get(PROFILE, headers=headers)).json()["name"]
            else:
                stored = (await client.get(ORGANIZATION, headers=headers)).json()["name"]
            problems.one_of(case, stored, stripped(value))
    problems.assert_none()


async def test_register_password_is_kept_exactly(client: httpx.AsyncClient) -> None:
    problems = Problems()
    for case, value in HOSTILE.items():
        body = _register_body(password=value)
        response = await client.post(REGISTER, json=body)
        expect = "\x00" not in value and 8 <= len(value) <= 128
        if problems.check(case, response, ok_status=201, expect_ok=expect):
            exact = await client.post(LOGIN, json={"email": body["email"], "password": value})
            problems.check(f"{case} login", exact, ok_status=200, expect_ok=True)
            if value.strip() != value:
                trimmed = {"email": body["email"], "password": value.strip()}
                refused = await client.post(LOGIN, json=trimmed)
                problems.check(
                    f"{case} trimmed", refused, ok_status=200, expect_ok=False, refusals=(401,)
                )
    problems.assert_none()


@pytest.mark.parametrize("field", ["email", "organization_slug"])
async def test_register_email_and_slug_refuse_hostile_text(
    client: httpx.AsyncClient, field: str
) -> None:
    problems = Problems()
    for case, value in HOSTILE.items():
        response = await client.post(REGISTER, json=_register_body(**{field: value}))
        problems.check(case, response, ok_status=201, expect_ok=False)
    problems.assert_none()


async def test_register_keeps_odd_but_valid_emails(client: httpx.AsyncClient) -> None:
    problems = Problems()
    for email in ODD_VALID_EMAILS:
        response = await client.post(REGISTER, json=_register_body(email=email))
        if problems.check(email, response, ok_status=201, expect_ok=True):
            problems.equal(email, response.json()["user"]["email"], email)
            tokens = await login(client, email)
            problems.equal(f"{email} login", tokens["user"]["email"], email)
    problems.assert_none()


async def test_register_with_hostile_invitation_token(client: httpx.AsyncClient) -> None:
    problems = Problems()
    for case, value in HOSTILE.items():
        body = {
            "email": f"{unique('invitee')}@example.com",
            "password": PASSWORD,
            "name": "Invitee",
            "invitation_token": value,
        }
        response = await client.post(REGISTER, json=body)
        valid_text = "\x00" not in value and len(value) <= 200
        problems.check(case, response, ok_status=201, expect_ok=False, refusals=(404, 422))
        if response.status_code == 404:
            assert valid_text, case
            assert response.json()["error"]["code"] == "invitation_invalid"
    problems.assert_none()


# --- login ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "expected_refusal"),
    [("email", 401), ("password", 401), ("organization_slug", 404), ("totp_code", None)],
)
async def test_login_with_hostile_text(
    client: httpx.AsyncClient, field: str, expected_refusal: int | None
) -> None:
    admin = await new_org_admin(client)
    limits = {"email": 320, "password": 128, "organization_slug": 63}
    problems = Problems()
    for case, value in HOSTILE.items():
        body = {"email": admin.email, "password": PASSWORD, field: value}
        response = await client.post(LOGIN, json=body)
        problems.check(case, response, ok_status=200, expect_ok=False, refusals=(401, 404, 422))
        if expected_refusal is None or response.status_code >= 500:
            continue
        well_formed = "\x00" not in value and len(value) <= limits[field]
        wanted = expected_refusal if well_formed else 422
        if response.status_code != wanted:
            problems.items.append(f"{case}: {response.status_code}, wanted {wanted}")
    # Nothing above got in or broke anything: the account still logs in normally.
    assert (await login(client, admin.email))["user"]["id"] == admin.user_id
    problems.assert_none()


# --- profile ----------------------------------------------------------------------------


async def test_profile_name(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    problems = Problems()
    for case, value in HOSTILE.items():
        response = await client.patch(PROFILE, headers=admin.headers, json={"name": value})
        if problems.check(case, response, ok_status=200, expect_ok=name_ok(value)):
            stored = (await client.get(PROFILE, headers=admin.headers)).json()["name"]
            problems.one_of(case, stored, stripped(value))
    problems.assert_none()


@pytest.mark.parametrize("position", ["value", "key", "nested"])
async def test_profile_fields(client: httpx.AsyncClient, position: str) -> None:
    admin = await new_org_admin(client)
    problems = Problems()
    for case, value in HOSTILE.items():
        shapes: dict[str, dict[str, Any]] = {
            "value": {"bio": value},
            "key": {value: "bio"},
            "nested": {"links": [{"title": value}]},
        }
        profile = shapes[position]
        response = await client.patch(PROFILE, headers=admin.headers, json={"profile": profile})
        if problems.check(case, response, ok_status=200, expect_ok=always_text(value)):
            stored = (await client.get(PROFILE, headers=admin.headers)).json()["profile"]
            problems.equal(case, stored, profile)
    problems.assert_none()


# --- organisation -----------------------------------------------------------------------


_ORG_TEXT: dict[str, tuple[Callable[[str], dict[str, Any]], Callable[[dict[str, Any]], Any]]] = {
    "name": (lambda v: {"name": v}, lambda org: org["name"]),
    "settings.timezone": (
        lambda v: {"settings": {"timezone": v}},
        lambda org: org["settings"]["timezone"],
    ),
    "settings.language": (
        lambda v: {"settings": {"language": v}},
        lambda org: org["settings"]["language"],
    ),
    "settings.date_format": (
        lambda v: {"settings": {"date_format": v}},
        lambda org: org["settings"]["date_format"],
    ),
    "branding.value": (lambda v: {"branding": {"tagline": v}}, lambda org: org["branding"]),
    "branding.key": (lambda v: {"branding": {v: "#ff0000"}}, lambda org: org["branding"]),
    "allowed_origins": (lambda v: {"allowed_origins": [v]}, lambda org: org["allowed_origins"]),
}
_ORG_ACCEPTS: dict[str, Callable[[str], bool | None]] = {
    "name": name_ok,
    "settings.timezone": text_ok(64),
    "settings.language": text_ok(16),
    "settings.date_format": text_ok(32),
    "branding.value": always_text,
    "branding.key": always_text,
    "allowed_origins": never,
}


@pytest.mark.parametrize("field", list(_ORG_TEXT))
async def test_organization_fields(client: httpx.AsyncClient, field: str) -> None:
    admin = await new_org_admin(client)
    build, read = _ORG_TEXT[field]
    problems = Problems()
    for case, value in HOSTILE.items():
        body = build(value)
        response = await client.patch(ORGANIZATION, headers=admin.headers, json=body)
        if problems.check(case, response, ok_status=200, expect_ok=_ORG_ACCEPTS[field](value)):
            stored = read((await client.get(ORGANIZATION, headers=admin.headers)).json())
            if field == "name":
                problems.one_of(case, stored, stripped(value))
            else:
                problems.equal(case, stored, read(body_as_org(body)))
    problems.assert_none()


def body_as_org(body: dict[str, Any]) -> dict[str, Any]:
    """The PATCH body shaped like the organisation it should produce (for the readers)."""
    settings_ = {"timezone": "UTC", "language": "en", "date_format": "YYYY-MM-DD"}
    return {
        "settings": {**settings_, **body.get("settings", {})},
        "branding": body.get("branding"),
        "allowed_origins": body.get("allowed_origins"),
    }


# --- numbers in the free-form JSON fields -----------------------------------------------

# Written as raw JSON text: some are beyond what a 64-bit integer or a double can hold, and
# NaN/Infinity are not JSON at all, though Python's parser takes them.
HOSTILE_NUMBERS = [
    "18446744073709551616",  # 2**64
    "-9223372036854775809",  # -(2**63) - 1
    "1" * 400,
    "1e20",
    "1.5e308",
    "1e400",
    "NaN",
    "-Infinity",
]


@pytest.mark.parametrize("field", ["profile", "branding"])
async def test_free_form_json_numbers_never_break_later_reads(
    client: httpx.AsyncClient, runtime: IdentityRuntime, field: str
) -> None:
    """Accepted and read back, or refused: but a stored value must never make reads fail.

    The reads checked include the platform-wide organisation list, which one organisation's
    branding must not be able to break for the operators.
    """
    admin = await new_org_admin(client)
    root = await new_super_admin(client, runtime)
    path = PROFILE if field == "profile" else ORGANIZATION
    readers = [(path, admin.headers), ("/api/v1/admin/organizations", bearer(root["access_token"]))]
    headers = {**admin.headers, "content-type": "application/json"}
    problems = Problems()
    for raw in HOSTILE_NUMBERS:
        label = raw[:25]
        body = f'{{"{field}": {{"n": {raw}}}}}'
        response = await client.patch(path, headers=headers, content=body)
        accepted = problems.check(
            label, response, ok_status=200, expect_ok=None, refusals=(400, 422)
        )
        for reader, reader_headers in readers:
            read = await client.get(reader, headers=reader_headers)
            if read.status_code != 200:
                problems.items.append(f"{label}: later GET {reader} -> {read.status_code}")
            elif accepted and reader == path:
                stored = read.json()[field]["n"]
                if float(stored) != pytest.approx(float(raw)):
                    problems.equal(label, stored, raw)
        # Reset, so that one bad value does not hide the next one.
        await client.patch(path, headers=admin.headers, json={field: {}})
    problems.assert_none()


# --- invitations ------------------------------------------------------------------------


async def test_invitation_fields(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    problems = Problems()
    for case, value in HOSTILE.items():
        email = await client.post(INVITATIONS, headers=admin.headers, json={"email": value})
        problems.check(f"email {case}", email, ok_status=201, expect_ok=False)
        body = {"email": f"{unique('role')}@example.com", "role": value}
        role = await client.post(INVITATIONS, headers=admin.headers, json=body)
        problems.check(f"role {case}", role, ok_status=201, expect_ok=False)
    for value in ODD_VALID_EMAILS:
        response = await client.post(INVITATIONS, headers=admin.headers, json={"email": value})
        if problems.check(value, response, ok_status=201, expect_ok=True):
            listed = (await client.get(INVITATIONS, headers=admin.headers)).json()
            problems.equal(value, value in {i["email"] for i in listed}, True)
    problems.assert_none()


# --- API keys ---------------------------------------------------------------------------


async def test_api_key_fields(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    problems = Problems()
    for case, value in HOSTILE.items():
        response = await client.post(API_KEYS, headers=admin.headers, json={"name": value})
        if problems.check(f"name {case}", response, ok_status=201, expect_ok=name_ok(value)):
            listed = (await client.get(API_KEYS, headers=admin.headers)).json()
            stored = next(k["name"] for k in listed if k["id"] == response.json()["id"])
            problems.one_of(f"name {case}", stored, stripped(value))
        for field, field_value in (
            ("permissions", [value]),
            ("permissions", ["api_keys:read", value]),
            ("role", value),
            ("expires_at", value),
        ):
            body = {"name": "k", field: field_value}
            refused = await client.post(API_KEYS, headers=admin.headers, json=body)
            problems.check(f"{field} {case}", refused, ok_status=201, expect_ok=False)
    problems.assert_none()


# --- property-based: any text at all ----------------------------------------------------

_ANY_TEXT = st.one_of(
    st.text(),
    st.text(min_size=195, max_size=205),
    st.sampled_from(list(HOSTILE.values())),
)
_PROPERTY = hypothesis.settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


@_PROPERTY
@given(name=_ANY_TEXT)
async def test_any_profile_name_is_stored_verbatim_or_refused(
    client: httpx.AsyncClient, admin: Account, name: str
) -> None:
    response = await client.patch(PROFILE, headers=admin.headers, json={"name": name})
    problems = Problems()
    if problems.check("name", response, ok_status=200, expect_ok=name_ok(name)):
        assert response.json()["name"] in stripped(name)
        stored = (await client.get(PROFILE, headers=admin.headers)).json()["name"]
        problems.one_of("name", stored, stripped(name))
    problems.assert_none()


@_PROPERTY
@given(name=_ANY_TEXT)
async def test_any_api_key_name_is_stored_verbatim_or_refused(
    client: httpx.AsyncClient, admin: Account, name: str
) -> None:
    response = await client.post(API_KEYS, headers=admin.headers, json={"name": name})
    problems = Problems()
    if problems.check("name", response, ok_status=201, expect_ok=name_ok(name)):
        listed = (await client.get(API_KEYS, headers=admin.headers)).json()
        stored = next(k["name"] for k in listed if k["id"] == response.json()["id"])
        problems.one_of("name", stored, stripped(name))
    problems.assert_none()


@_PROPERTY
@given(name=_ANY_TEXT, timezone=st.text(max_size=70))
async def test_any_organization_name_and_setting_is_stored_verbatim_or_refused(
    client: httpx.AsyncClient, admin: Account, name: str, timezone: str
) -> None:
    body = {"name": name, "settings": {"timezone": timezone}}
    response = await client.patch(ORGANIZATION, headers=admin.headers, json=body)
    problems = Problems()
    name_expected = name_ok(name)
    expect = False if not text_ok(64)(timezone) else name_expected
    if problems.check("organization", response, ok_status=200, expect_ok=expect):
        stored = (await client.get(ORGANIZATION, headers=admin.headers)).json()
        problems.one_of("name", stored["name"], stripped(name))
        problems.equal("timezone", stored["settings"]["timezone"], timezone)
    problems.assert_none()
