"""A managed vLLM server's key: its own for each server of a host, lasting, its owner's only, and
never shown on a command line in a log (a live server refusing others' requests is shown in
tests/test_managed_servers.py)."""

from __future__ import annotations

from core.batch_app.server_keys import server_key
from core.batch_app.vllm_server import redacted


def test_a_key_on_the_command_line_is_never_logged():
    assert redacted(["--model", "m", "--api-key", "sk-1", "--api-key=sk-2", "--port", "8000"]) == \
        ["--model", "m", "--api-key", "***", "--api-key=***", "--port", "8000"]


def test_each_server_of_a_host_has_its_own_lasting_key(tmp_path):
    first, second = server_key(tmp_path, 8000), server_key(tmp_path, 8001)
    assert first != second and first == server_key(tmp_path, 8000) and len(first) > 40
    assert (tmp_path / "server-keys.secret").stat().st_mode & 0o077 == 0  # its owner's only
    assert server_key(tmp_path / "other-host", 8000) != first
