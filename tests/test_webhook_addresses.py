"""A try connects to the address it checked, with the URL's name for TLS and `Host`: a real
sender whose resolver answers differently at every lookup (DNS rebinding) sends to the first
answer and never looks again, over TLS verified for the name; with private addresses refused, a
name that turns to loopback after its check never reaches loopback. Private, NAT64 and other
translated addresses are refused."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from core.batch_app import webhook_transport
from core.batch_app.config import Settings
from core.batch_app.database import migrate, open_database
from core.batch_app.domain import webhooks
from core.batch_app.domain.statuses import BatchStatus
from core.batch_app.webhook_transport import is_public

from .conftest import REPO, scratch_database, stack_env, wait_for

NAME = "hooks.rebind.test"


@pytest.fixture
def db_url(database):
    with scratch_database(database) as url:
        migrate(url)
        yield url


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for NAME (its own authority): (certificate, key) files."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


class TlsReceiver:
    """An https receiver on one address, serving NAME's certificate; keeps the TLS server names
    asked for, the connections accepted and the `Host` of every delivery."""

    def __init__(self, address: str, port: int, certificate: tuple[Path, Path]):
        import ssl

        self.server_names: list[str | None] = []
        self.hosts: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.hosts.append(self.headers["Host"])
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certificate)
        context.sni_callback = lambda _socket, name, _context: self.server_names.append(name)
        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def rebinding_sender(url: str, data_dir: Path, log: Path, answers: str, certificate: Path,
                     **overrides: str) -> subprocess.Popen:
    env = stack_env(url, data_dir, "rebinding-sender", WORKERS="[]", WEBHOOK_POLL_INTERVAL="0.2",
                    WEBHOOK_TIMEOUT="2", WEBHOOK_BACKOFF_MIN="0.5", WEBHOOK_BACKOFF_MAX="1", REBIND_HOST=NAME,
                    REBIND_ANSWERS=answers, REBIND_LOG=str(log), SSL_CERT_FILE=str(certificate), **overrides)
    output = open(Path(env["LOG_DIR"]) / "stdout.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "tests.rebinding_sender"], env=env, cwd=REPO, stdout=output,
                            stderr=subprocess.STDOUT)


def event_for(url: str, endpoint_url: str) -> str:
    """An endpoint of NAME's URL and one event for it, written as the API and a batch's ending would."""
    engine = open_database(url, pool_size=1)
    with engine.begin() as conn:
        endpoint = webhooks.create_endpoint(conn, Settings(), "p", name="rebinding", url=endpoint_url,
                                            event_types=["batch.failed"])
        webhooks.record_batch_event(conn, "p", "batch_rebinding", BatchStatus.FAILED)
    engine.dispose()
    return endpoint.id


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def test_a_try_connects_to_the_address_it_checked_with_the_name_for_tls_and_host(db_url, data_dir, tmp_path,
                                                                                  certificate):
    checked = TlsReceiver("127.0.0.1", 0, certificate)
    rebound = TlsReceiver("127.0.0.2", checked.port, certificate)  # where a second lookup would lead
    lookups = tmp_path / "lookups"
    event_for(db_url, f"https://{NAME}:{checked.port}/hooks")
    sender = rebinding_sender(db_url, data_dir, lookups, "127.0.0.1,127.0.0.2", certificate[0],
                              WEBHOOK_ALLOW_PRIVATE="true")
    try:
        wait_for(lambda: checked.hosts or rebound.hosts, 30, message="the delivery")
        assert lookups.read_text().split() == ["127.0.0.1"]  # one lookup, and that address connected to
        assert (checked.server_names, checked.hosts) == ([NAME], [f"{NAME}:{checked.port}"])
        assert rebound.server_names == rebound.hosts == []
    finally:
        stop(sender)
        checked.close()
        rebound.close()


def test_a_name_that_turns_private_after_its_check_never_reaches_it(db_url, data_dir, tmp_path, certificate):
    loopback = TlsReceiver("127.0.0.1", 0, certificate)
    lookups = tmp_path / "lookups"
    endpoint_id = event_for(db_url, f"https://{NAME}:{loopback.port}/hooks")
    # Public at the first lookup, loopback at the second: a second lookup to connect would reach it.
    sender = rebinding_sender(db_url, data_dir, lookups, "1.0.0.1,127.0.0.1", certificate[0])
    engine = open_database(db_url, pool_size=1)
    try:
        with engine.connect() as conn:
            tried = lambda: conn.execute(sa.text(
                "SELECT attempts, last_error FROM webhook_deliveries WHERE endpoint_id = :e"),
                {"e": endpoint_id}).one()
            # A try is counted when it is leased, and its error recorded when it ends: the second
            # try's is the refusal.
            wait_for(lambda: "loopback" in (tried().last_error or "") or loopback.hosts, 30,
                     message="the second try refused")
            attempts, error = tried()
        assert loopback.server_names == loopback.hosts == []
        answers = lookups.read_text().split()
        # Each try looked the name up once (a third may be leased, or have looked up, as the two are
        # read): the public answer was connected to (and failed), the loopback answer was refused
        # before any connection.
        assert answers[:2] == ["1.0.0.1", "127.0.0.1"] and attempts - 1 <= len(answers) <= attempts + 1
        assert error.startswith("Refused: the URL's host resolves to a loopback"), error
    finally:
        stop(sender)
        engine.dispose()
        loopback.close()


@pytest.mark.parametrize(("address", "public"), [
    ("1.1.1.1", True), ("2606:4700:4700::1111", True), ("64:ff9b::101:101", True),  # NAT64 of 1.1.1.1
    ("127.0.0.1", False), ("10.0.0.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("::1", False), ("fe80::1", False), ("fc00::1", False), ("224.0.0.1", False), ("0.0.0.0", False),
    ("64:ff9b::a00:1", False), ("64:ff9b::7f00:1", False), ("64:ff9b:1::1", False),  # NAT64 of private ones
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("2002:a00:1::1", False), ("::a9fe:a9fe", False),
])
def test_translated_private_addresses_are_refused(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


def test_the_api_refuses_names_that_resolve_to_loopback(api, client):
    """`localhost` and a NAT64 spelling of loopback, on the shared API (private addresses refused)."""
    for url in ("https://localhost/hook", "https://[64:ff9b::7f00:1]/hook", "https://[::ffff:7f00:1]/hook"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.webhooks.create(url=url, event_types=["batch.failed"], name="x")
        assert refused.value.body["param"] == "url", url


def test_names_of_one_project_that_never_resolve_hold_up_no_other_projects_lookups(monkeypatch):
    """A project whose receivers' names hang the resolver holds at most LOOKUPS_PER_OWNER of its
    threads, past its tries' deadlines; another project's lookups go on at once."""
    answered = threading.Event()
    real = webhook_transport.socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host.endswith(".hangs.test"):
            answered.wait(30)  # a resolver that does not answer until the test lets it
            raise OSError("no answer")
        return real("127.0.0.1", *args[:1])

    monkeypatch.setattr(webhook_transport.socket, "getaddrinfo", getaddrinfo)

    async def check(project: str, name: str, timeout: float = 0.3) -> str:
        try:
            await webhook_transport.check_url(f"https://{name}/hook", True, timeout, project)
        except Exception as exc:  # noqa: BLE001 (what each check said is the result)
            return str(exc)
        return "ok"

    async def scenario() -> tuple[list[str], str, str]:
        hanging = [await check("hostile", f"n{i}.hangs.test") for i in range(webhook_transport.LOOKUPS_PER_OWNER)]
        refused = await check("hostile", "more.hangs.test")  # its threads are all still held
        # The hostile lookups stay hung until the scenario ends: a bystander waiting for their
        # threads would time out. Its own deadline is long enough for a machine under load.
        return hanging, refused, await check("bystander", "receiver.example.test", timeout=10)

    try:
        hanging, refused, bystander = asyncio.run(scenario())
    finally:
        answered.set()
    assert all("did not resolve within 0.3 s" in said for said in hanging), hanging
    assert "still unanswered" in refused and bystander == "ok"
    wait_for(lambda: not webhook_transport._lookups_held, 10, message="the hung lookups' threads back")
