"""/openapi.json documents every error shape a route can answer (``responses=`` on the routes)."""

from __future__ import annotations

from server.app import create_app


def test_every_v1_route_documents_its_errors():
    spec = create_app().openapi()
    assert "ErrorResponse" in spec["components"]["schemas"]
    chat = spec["paths"]["/v1/audio/chat"]["post"]["responses"]
    assert {"400", "401", "403", "404", "408", "413", "415", "422", "429", "503", "504"} <= set(chat)
    assert chat["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    for path, methods in spec["paths"].items():
        if path.startswith("/v1/"):
            for method, op in methods.items():
                assert "401" in op["responses"], f"{method.upper()} {path} does not document 401"
