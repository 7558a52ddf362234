"""The reference API's user directory on a real OpenLDAP server (slapd started by the tests).

Each test starts slapd on a free loopback port with a generated slapd.conf (core, cosine and
inetOrgPerson schemas, plus a small schema adding sAMAccountName) and an MDB database loaded
with slapadd, then drives the reference API's app against it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import STOCKHOLM, Clock, free_port, need_programs, order_form, stop_process, wait_http
from gateway.reference.app import Settings, create_app
from gateway.reference.documents import SigningIdentity
from gateway.reference.ldap_directory import LdapDirectory, equality_filter

if "/usr/sbin" not in os.environ.get("PATH", "").split(os.pathsep):   # Debian keeps slapd there
    os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin"
need_programs("slapd", "slapadd")

BASE = "ou=people,dc=example,dc=com"
ADMIN_DN, ADMIN_PW = "cn=admin,dc=example,dc=com", "admin secret"
# An OID under OpenLDAP's experimental arc (1.3.6.1.4.1.4203.666), for tests only.
TEST_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.4203.666.11.99.1 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{256} SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.4203.666.11.99.2 NAME 'testAccount' AUXILIARY MAY sAMAccountName )
"""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def person(uid: str, sam: str | None = None, **attrs: str) -> str:
    lines = [f"dn: uid={uid},{BASE}", "objectClass: inetOrgPerson", "objectClass: testAccount",
             f"uid: {uid}", f"cn: {uid}", f"sn: {attrs.pop('sn', uid)}"]
    if sam is not None:
        lines.append(f"sAMAccountName:: {_b64(sam)}")
    for name, value in attrs.items():
        lines.append(f"{name}:: {_b64(value)}")
    return "\n".join(lines)


USERS = "\n\n".join([
    "dn: dc=example,dc=com\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
    f"dn: {BASE}\nobjectClass: organizationalUnit\nou: people",
    # No mobile in the entry: the request's fills it.
    f"dn: uid=cborgstrom,{BASE}\nobjectClass: inetOrgPerson\nobjectClass: testAccount\nuid: cborgstrom\n"
    f"cn: Christer Borgstrom\nsAMAccountName: cborgstrom\ngivenName: Christer\nsn:: {_b64('Borgström')}\n"
    "mail: christer.borgstrom@example.com",
    person("jdoe", "jdoe", givenName="John", sn="Doe", mail="jdoe@example.com", mobile="+46700000001"),
    person("jane", "jane", givenName="Jane", sn="Doe", mail="jane@example.com"),
    # Two people sharing a mail address: a look-up by mail is ambiguous.
    person("twin1", "twin1", givenName="Tim", mail="shared@example.com"),
    person("twin2", "twin2", givenName="Tom", mail="shared@example.com"),
    # Values holding filter metacharacters, and their look-alikes a wildcard would also find.
    person("star", "a*b(c)d\\e", givenName="Star"),
    person("starlike", "axb(c)d\\e", givenName="Lookalike"),
]) + "\n"


class Slapd:
    """One slapd on 127.0.0.1:port; stop() and start() again keep the port and the data."""

    def __init__(self, folder: Path, anonymous_read: bool = True):
        self.folder, self.port = folder, free_port()
        self.url = f"ldap://127.0.0.1:{self.port}/{BASE}"
        self.proc: subprocess.Popen | None = None
        (folder / "db").mkdir(parents=True)
        (folder / "test.schema").write_text(TEST_SCHEMA)
        access = "access to * by * read" if anonymous_read else "access to * by * none"
        (folder / "slapd.conf").write_text(f"""\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include {folder}/test.schema
pidfile {folder}/slapd.pid
argsfile {folder}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "dc=example,dc=com"
rootdn "{ADMIN_DN}"
rootpw "{ADMIN_PW}"
directory {folder}/db
{access}
""")
        (folder / "users.ldif").write_text(USERS, encoding="utf-8")
        subprocess.run([shutil.which("slapadd"), "-f", str(folder / "slapd.conf"), "-l", str(folder / "users.ldif")],
                       check=True, capture_output=True)

    def start(self, deadline_s: float = 15.0) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("slapd"), "-f", str(self.folder / "slapd.conf"), "-h", f"ldap://127.0.0.1:{self.port}/",
             "-d", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + deadline_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("slapd did not listen in time") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None


@pytest.fixture
def slapd(tmp_path):
    server = Slapd(tmp_path / "ldap")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def locked_slapd(tmp_path):
    """Nothing is readable but to the bound admin."""
    server = Slapd(tmp_path / "ldap-locked", anonymous_read=False)
    server.start()
    yield server
    server.stop()


def settings(tmp_path, directory) -> Settings:
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    return Settings(data_dir=data, timezone=STOCKHOLM, directory=directory,
                    signing=SigningIdentity.load_or_create(data), max_body_bytes=2 * 1024 * 1024)


@pytest.fixture
async def client(aiohttp_client, tmp_path, slapd):
    return await aiohttp_client(create_app(settings(tmp_path, LdapDirectory(slapd.url, timeout_s=2)), clock=Clock()))


def internal(identifier: str, **attributes: str) -> str:
    return json.dumps({"source": "INTERNAL", "identifier": identifier,
                       "attributes": {k: {"value": v} for k, v in attributes.items()}})


async def create(client, solicitor: str, signers: list[str] | None = None):
    return await client.post("/orders", data=order_form(solicitor=solicitor, signers=signers or [solicitor]))


async def test_the_entry_fills_the_order_and_the_request_only_what_it_lacks(client):
    resp = await create(client, internal("samaccountname=CBORGSTROM", givenName="Mallory", mobile="+46709999999"),
                        [internal("uid=jdoe", mail="evil@example.com")])
    assert resp.status == 200, await resp.text()
    order = await (await client.get(f"/orders/{await resp.text()}")).json()
    solicitor, (signer,) = order["solicitor"], order["signers"]
    assert (solicitor["givenName"], solicitor["surname"]) == ("Christer", "Borgström")   # the entry wins
    assert solicitor["mail"] == "christer.borgstrom@example.com"
    assert solicitor["mobile"] == "+46709999999"          # the entry has no mobile: the request's
    assert (signer["givenName"], signer["mail"], signer["mobile"]) == ("John", "jdoe@example.com", "+46700000001")


async def test_no_entry_is_a_400_as_with_the_yaml_directory(client):
    resp = await create(client, internal("sAMAccountName=nobody", givenName="Nobody"))
    assert resp.status == 400 and resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["field"] == "solicitor" and "not in the user directory" in body["detail"]


async def test_several_entries_are_refused_with_409(client):
    resp = await create(client, internal("mail=shared@example.com"))
    assert resp.status == 409 and resp.content_type == "application/problem+json"
    assert "several" in (await resp.json())["detail"]


@pytest.mark.parametrize("identifier", [
    "uid=*", "uid=j*", "uid=*e", "uid=jdoe)(uid=*", "uid=*)(|(objectClass=*", "sAMAccountName=*)(uid=*",
    "uid=jdoe\x00", "uid=\x00*", "uid=jdoe\\2a", "uid=j\\2a", "mail=*@example.com",
    "sAMAccountName=a\\2ab\\28c\\29d\\5ce",   # escapes in the input are text: not the a*b(c)d\e entry
])
async def test_an_identifier_never_widens_the_search(client, identifier):
    """Wildcards, parentheses, NUL and backslashes are matched literally: no entry holds these values, so 400."""
    resp = await create(client, internal(identifier))
    assert resp.status == 400, await resp.text()
    assert "not in the user directory" in (await resp.json())["detail"]


async def test_escaped_characters_match_exactly_the_entry_that_holds_them(client):
    resp = await create(client, internal("sAMAccountName=a*b(c)d\\e"))
    assert resp.status == 200, await resp.text()
    order = await (await client.get(f"/orders/{await resp.text()}")).json()
    assert order["solicitor"]["givenName"] == "Star"   # not its look-alike axb(c)d\e


@pytest.mark.parametrize("identifier", [
    "(uid=jdoe", "u(id=jdoe", "*=jdoe", "uid;binary=jdoe", "1uid=jdoe", "uid)(cn=jdoe", "ui d=jdoe", "ü=jdoe",
])
async def test_an_attribute_that_is_not_a_name_is_a_400(client, identifier):
    resp = await create(client, internal(identifier))
    assert resp.status == 400, await resp.text()
    assert "is not an LDAP attribute name" in (await resp.json())["detail"]


def test_the_filter_escapes_as_rfc_4515_says():
    assert equality_filter("uid", "a*b(c)d\\e\x00") == "(uid=a\\2ab\\28c\\29d\\5ce\\00)"
    assert equality_filter("sAMAccountName", "jdoe") == "(sAMAccountName=jdoe)"
    for bad in ("(uid", "uid)", "", "u id", "1a"):
        with pytest.raises(ValueError):
            equality_filter(bad, "x")


async def test_ldap_search_in_anonymize_is_resolved_the_same_way(client):
    resp = await create(client, internal("uid=jane"))
    order_id = await resp.text()
    assert (await client.post(f"/workflow/orders/{order_id}/cancel")).status == 200
    # Stored as the directory spells it (uid=jane); found again from a differently cased identifier.
    resp = await client.post("/anonymize", json={"ldapSearch": {"source": "INTERNAL", "identifier": "UID=JANE"}})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"anonymized": 1}
    resp = await client.post("/anonymize", json={"ldapSearch": {"source": "INTERNAL", "identifier": "uid=j*"}})
    assert resp.status == 404, await resp.text()
    resp = await client.post("/anonymize", json={"ldapSearch": {"source": "INTERNAL",
                                                                "identifier": "mail=shared@example.com"}})
    assert resp.status == 409, await resp.text()
    resp = await client.post("/anonymize", json={"ldapSearch": {"source": "INTERNAL", "identifier": "(uid=x"}})
    assert resp.status == 400, await resp.text()


async def test_a_bound_directory(aiohttp_client, tmp_path, locked_slapd):
    password_file = tmp_path / "ldap-password"
    password_file.write_text(ADMIN_PW + "\n")
    from gateway.reference.server import _directory
    from gateway.shell.settings import ReferenceAPI, ReferenceLdap

    bound = _directory(ReferenceAPI(directory=locked_slapd.url,
                                    ldap=ReferenceLdap(bind_dn=ADMIN_DN, password_file=password_file, timeout_s=2)))
    client = await aiohttp_client(create_app(settings(tmp_path, bound), clock=Clock()))
    resp = await create(client, internal("uid=jdoe"))
    assert resp.status == 200, await resp.text()
    assert (await client.get("/readyz")).status == 200
    # Anonymously, or with a wrong password, nothing is readable: 503, never the request's attributes.
    for i, directory in enumerate((LdapDirectory(locked_slapd.url, timeout_s=2),
                                   LdapDirectory(locked_slapd.url, ADMIN_DN, "wrong", timeout_s=2))):
        other = await aiohttp_client(create_app(settings(tmp_path / f"other{i}", directory), clock=Clock()))
        resp = await create(other, internal("uid=jdoe", givenName="John"))
        assert resp.status == 503, await resp.text()
        assert (await other.get("/readyz")).status == 503


async def test_an_anonymous_directory_is_ready(client):
    resp = await client.get("/readyz")
    assert resp.status == 200 and (await resp.json())["ready"] is True


async def test_a_directory_that_is_down_is_a_503_until_it_is_back(client, slapd):
    slapd.stop()
    resp = await create(client, internal("uid=jdoe", givenName="John", sn="Doe"))
    assert resp.status == 503 and resp.content_type == "application/problem+json"
    assert (await resp.json())["type"].endswith("directory-unavailable")
    resp = await client.post("/anonymize", json={"ldapSearch": {"source": "INTERNAL", "identifier": "uid=jdoe"}})
    assert resp.status == 503
    resp = await client.get("/readyz")
    assert resp.status == 503 and "directory" in (await resp.json())["problems"]
    slapd.start()   # same port, same data: no restart of the reference API
    resp = await create(client, internal("uid=jdoe"))
    assert resp.status == 200, await resp.text()
    assert (await client.get("/readyz")).status == 200


async def test_a_directory_that_never_answers_times_out_with_503(aiohttp_client, tmp_path):
    """A listener that accepts and says nothing: the look-up gives up after timeout_s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"ldap://127.0.0.1:{silent.getsockname()[1]}/{BASE}"
        client = await aiohttp_client(create_app(settings(tmp_path, LdapDirectory(url, timeout_s=0.5)),
                                                 clock=Clock()))
        started = time.monotonic()
        resp = await create(client, internal("uid=jdoe"))
        assert resp.status == 503
        assert time.monotonic() - started < 5


def test_ldap_urls_are_kept_and_yaml_paths_resolved(tmp_path):
    from gateway.core.errors import SettingsError
    from gateway.shell.settings import load_config

    config = tmp_path / "config.yaml"
    config.write_text(f"reference_api:\n  directory: ldaps://ldap.example.com:636/{BASE}\n")
    assert load_config(config).reference_api.directory == f"ldaps://ldap.example.com:636/{BASE}"
    config.write_text("reference_api:\n  directory: people.yaml\n")
    assert load_config(config).reference_api.directory == str(tmp_path / "people.yaml")
    for bad in ("ldap://ldap.example.com:636/", "ldap://:389/dc=x", "http://x/dc=x"):
        config.write_text(f"reference_api:\n  directory: {bad}\n")
        with pytest.raises(SettingsError, match="reference_api.directory"):
            load_config(config)
    config.write_text(f"reference_api:\n  directory: ldap://h:389/{BASE}\n  ldap: {{bind_dn: cn=x}}\n")
    with pytest.raises(SettingsError, match="password_file"):
        load_config(config)


async def test_gateway_reference_api_from_a_config_with_a_bound_ldap_directory(tmp_path, locked_slapd, run_gateway):
    """The config keys end to end: reference_api.directory (an ldap:// URL) and reference_api.ldap.*."""
    import aiohttp

    (tmp_path / "ldap-password").write_text(ADMIN_PW + "\n")
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"reference_api": {
        "listen": f"127.0.0.1:{port}", "data_dir": "data/", "directory": locked_slapd.url,
        "ldap": {"bind_dn": ADMIN_DN, "password_file": "ldap-password", "timeout_s": 2},
    }}))
    proc = run_gateway("reference-api", "-c", str(config))
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
            assert r.status == 200, await r.text()
        async with s.post(f"http://127.0.0.1:{port}/orders",
                          data=order_form(solicitor=internal("uid=jdoe"), signers=[internal("uid=jane")])) as r:
            assert r.status == 200, await r.text()
            order_id = await r.text()
        async with s.get(f"http://127.0.0.1:{port}/orders/{order_id}") as r:
            order = await r.json()
    assert order["solicitor"]["mail"] == "jdoe@example.com" and order["signers"][0]["givenName"] == "Jane"
