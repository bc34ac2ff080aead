"""Admin routes' authentication on the real app under uvicorn: 401/403 in OpenAI's error shape."""

from __future__ import annotations

import httpx
import pytest
from moefleet.engine.server.admin import admin_token, make_admin_router
from moefleet.engine.server.async_engine import LocalEngineClient
from server.conftest import serve_app
from server.fake_engine import FakeEngine

pytestmark = pytest.mark.timeout(60)


def test_admin_token_from_file_or_env(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("  abc \n")
    assert admin_token(str(token_file), env={"MOEFLEET_ADMIN_TOKEN": "env"}) == "abc"
    assert admin_token(None, env={"MOEFLEET_ADMIN_TOKEN": "env"}) == "env"
    assert admin_token(None, env={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        admin_token(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "token,headers,status,code",
    [
        (None, {"Authorization": "Bearer anything"}, 403, "admin_disabled"),  # no token configured
        ("s3cret", {}, 401, "unauthorized"),  # no bearer
        ("s3cret", {"Authorization": "Basic s3cret"}, 401, "unauthorized"),
        ("s3cret", {"Authorization": "Bearer s3cre"}, 403, "forbidden"),  # wrong bearer
        ("s3cret", {"Authorization": "Bearer s3cret"}, 409, "eplb_inactive"),  # passes auth; EPLB off here
    ],
)
def test_admin_routes_refuse_without_the_right_bearer(token, headers, status, code):
    engine = FakeEngine()
    client = LocalEngineClient(engine, max_model_len=engine.max_model_len, vocab_size=257)
    with serve_app(client, routers=[make_admin_router(token, find_controller=lambda: None)]) as server:
        for method, path in (("GET", "/admin/eplb"), ("POST", "/admin/eplb/rebalance")):
            reply = httpx.request(method, server.base_url + path, headers=headers, timeout=10)
            assert reply.status_code == status, reply.text
            error = reply.json()["error"]
            assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
