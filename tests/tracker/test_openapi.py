"""``/openapi.json`` tells the truth: valid OpenAPI, every path parameter declared, and the
status codes, bounds and request bodies it declares are the ones the server acts on."""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from openapi_spec_validator import validate

from p2pnode.discovery.tracker import TrackerClient
from p2pnode.discovery.tracker_api import (
    ANNOUNCE_DOMAIN,
    OUTCOME_DOMAIN,
    SIGNATURE_HEADER,
    sign_body,
)
from p2pnode.release import keys
from p2pnode.release import manifest as M
from p2pnode.release.metadata import ReleaseInfo, UpdateType
from tests.support.tracker import ADMIN, APP
from tracker import Tracker, core, outcomes, serve_tracker
from tracker.openapi import openapi_document

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def declared_success(doc: dict[str, Any], path: str, method: str) -> int:
    """The one 2xx status code the document declares for an operation."""
    codes = [int(c) for c in doc["paths"][path][method]["responses"] if c.startswith("2")]
    assert len(codes) == 1, (path, method, codes)
    return codes[0]


def body_schema(doc: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    """The declared JSON request-body schema, resolvable on its own (it may $ref components)."""
    schema = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return {**schema, "components": doc["components"]}


def check_answer(doc: dict[str, Any], path: str, method: str, res: Any) -> None:
    """``res`` has the declared status, content type and (JSON) schema."""
    responses = doc["paths"][path][method]["responses"]
    declared = responses.get(str(res.status_code)) or responses[f"{res.status_code // 100}XX"]
    (media,) = declared["content"]
    assert res.headers["content-type"].split(";")[0] == media, (path, method)
    if media == "application/json":
        schema = {**declared["content"][media]["schema"], "components": doc["components"]}
        jsonschema.validate(res.json(), schema)


def test_the_document_is_valid_openapi_with_every_path_parameter_declared() -> None:
    doc = openapi_document()
    validate(doc)  # raises on the first violation of the OpenAPI 3.1 specification
    for path, method, op in operations(doc):
        assert op["responses"], (path, method)
        assert any(c.startswith("2") for c in op["responses"]), (path, method)
        for answer in op["responses"].values():
            assert answer.get("content"), (path, method)  # every answer has a content type
        declared = {
            p["name"]
            for p in doc["paths"][path].get("parameters", []) + op.get("parameters", [])
            if p["in"] == "path"
        }
        assert declared == set(re.findall(r"{(\w+)}", path)), (path, method)
        for p in op.get("parameters", []):
            assert p["in"] != "path" or p["required"] is True, (path, method, p["name"])
        if method == "post":
            assert "requestBody" in op, path


def test_signed_bodies_declare_the_fields_the_parsers_take() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for name, required, optional in (
        ("Announce", core._ANNOUNCE_REQUIRED, core._ANNOUNCE_OPTIONAL),
        ("Outcome", outcomes._REQUIRED, outcomes._OPTIONAL),
    ):
        assert schemas[name]["additionalProperties"] is False
        assert set(schemas[name]["required"]) == required, name
        assert set(schemas[name]["properties"]) == required | optional, name


def test_every_route_of_the_app_is_in_the_document(tracker: Tracker) -> None:
    doc = openapi_document()
    for route in tracker.app.routes:
        path = route.path.replace(":str", "")  # type: ignore[attr-defined]
        if path in ("/", "/dashboard/{name}"):
            continue
        for method in route.methods or ():  # type: ignore[attr-defined]
            if method != "HEAD":
                assert method.lower() in doc["paths"][path], (method, path)


async def test_declared_status_codes_are_what_the_server_answers(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    http = client._http
    doc = (await http.get("/openapi.json")).json()
    assert doc == json.loads(json.dumps(openapi_document()))
    check_answer(doc, "/healthz", "get", await http.get("/healthz"))
    check_answer(doc, "/metrics", "get", await http.get("/metrics"))
    check_answer(doc, "/dashboard", "get", await http.get("/dashboard"))

    new_app = {
        "app": "other.app_1",
        "key": keys.format_public_key(keys.public_key_bytes(keys.generate_key())),
    }
    jsonschema.validate(new_app, body_schema(doc, "/v1/apps", "post"))
    res = await http.post("/v1/apps", json=new_app, headers=AUTH)
    assert res.status_code == declared_success(doc, "/v1/apps", "post") == 201

    one = make_manifest(1)
    two = make_manifest(2, info=ReleaseInfo(UpdateType.CRITICAL, "notes <b>"))
    publish = "/v1/apps/{app}/channels/{channel}/manifests"
    for m in (one, two):
        res = await http.post(
            f"/v1/apps/{APP}/channels/stable/manifests",
            content=m.encode(),
            headers={**AUTH, "Content-Type": "application/x-p2pnode-manifest"},
        )
        assert res.status_code == declared_success(doc, publish, "post") == 201
    latest = "/v1/apps/{app}/channels/{channel}"
    res = await http.get(f"/v1/apps/{APP}/channels/stable")
    check_answer(doc, latest, "get", res)  # a head with every field: the schema lists them
    assert res.json()["update_type"] == "critical" and res.json()["notes"] == "notes <b>"

    for action, body in (("promote", {"manifest_id": two.id.hex()}), ("rollback", {})):
        path = f"/v1/apps/{{app}}/channels/{{channel}}/{action}"
        jsonschema.validate(body, body_schema(doc, path, "post"))
        res = await http.post(f"/v1/apps/{APP}/channels/stable/{action}", json=body, headers=AUTH)
        assert res.status_code == declared_success(doc, path, "post") == 200
        check_answer(doc, path, "post", res)

    node = keys.generate_key()
    outcome = {
        "app": APP,
        "manifest": one.id.hex(),
        "to_build": 1,
        "kind": "install",
        "outcome": "success",
    }
    raw, sig = sign_body(node, OUTCOME_DOMAIN, outcome)
    jsonschema.validate(json.loads(raw), body_schema(doc, "/v1/outcomes", "post"))
    res = await http.post("/v1/outcomes", content=raw, headers={SIGNATURE_HEADER: sig})
    assert res.status_code == declared_success(doc, "/v1/outcomes", "post") == 201

    node_id = keys.node_id_of(keys.public_key_bytes(node)).hex()
    for method in ("get", "delete"):
        res = await http.request(method.upper(), f"/v1/peers/{node_id}", headers=AUTH)
        assert res.status_code == declared_success(doc, "/v1/peers/{node_id}", method) == 200


async def test_port_zero_is_declared_and_accepted_and_the_bounds_match(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    http = client._http
    m = make_manifest(1)
    await client.publish(APP, "stable", m.encode())
    doc = openapi_document()
    schema = body_schema(doc, "/v1/announce", "post")
    key = keys.generate_key()
    base = {
        "key": keys.format_public_key(keys.public_key_bytes(key)),
        "app": APP,
        "manifest": m.id.hex(),
    }

    async def post(**fields: Any) -> int:
        obj = {**base, "ts": int(time.time()), "nonce": os.urandom(8).hex(), **fields}
        body = json.dumps(obj).encode()
        sig = keys.sign(key, ANNOUNCE_DOMAIN, body).hex()
        res = await http.post("/v1/announce", content=body, headers={SIGNATURE_HEADER: sig})
        return res.status_code

    def declared_valid(**fields: Any) -> bool:
        obj = {**base, "ts": int(time.time()), "nonce": "00" * 8, **fields}
        return jsonschema.Draft202012Validator(schema).is_valid(obj)

    cases: list[dict[str, Any]] = [
        {"port": 0},
        {"port": 65535},
        {"port": -1},
        {"port": 65536},
        {"port": 7000, "numwant": 50},
        {"port": 7000, "numwant": 51},
        {"port": 7000, "app": "../etc"},
        {"port": 7000, "app": "a" * 65},
    ]
    for fields in cases:
        accepted = await post(**fields) == declared_success(doc, "/v1/announce", "post")
        assert accepted == declared_valid(**fields), fields
    assert await post(port=0) == 200


async def test_rollout_feed_and_audit_answer_as_declared(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    http = client._http
    doc = (await http.get("/openapi.json")).json()
    one, two = make_manifest(1), make_manifest(2)
    publish = "/v1/apps/{app}/channels/{channel}/manifests"
    params = {p["name"]: p["schema"] for p in doc["paths"][publish]["post"]["parameters"]}
    for m, query in ((one, {}), (two, {"rollout": 10})):
        for name, value in query.items():
            jsonschema.validate(value, params[name])
        res = await http.post(
            f"/v1/apps/{APP}/channels/stable/manifests",
            params=query,
            content=m.encode(),
            headers={**AUTH, "Content-Type": "application/x-p2pnode-manifest"},
        )
        assert res.status_code == declared_success(doc, publish, "post") == 201
    bad = await http.post(
        f"/v1/apps/{APP}/channels/stable/manifests",
        params={"rollout": params["rollout"]["maximum"] + 1},
        content=make_manifest(3).encode(),
        headers={**AUTH, "Content-Type": "application/x-p2pnode-manifest"},
    )
    assert bad.status_code == 400

    feed = "/v1/apps/{app}/channels/{channel}"
    query = {"node": "ab" * 20, "have": one.id.hex()}
    declared = {p["name"]: p["schema"] for p in doc["paths"][feed]["get"]["parameters"]}
    for name, value in query.items():
        jsonschema.validate(value, declared[name])
    res = await http.get(f"/v1/apps/{APP}/channels/stable", params=query)
    check_answer(doc, feed, "get", res)
    assert res.json()["rollout"]["percent"] == 10
    assert (
        await http.get(f"/v1/apps/{APP}/channels/stable", params={"node": "x"})
    ).status_code == 400

    path = "/v1/apps/{app}/channels/{channel}/rollout"
    check_answer(doc, path, "get", await http.get(f"/v1/apps/{APP}/channels/stable/rollout"))
    for body in ({"action": "raise", "percent": 50}, {"action": "halt", "threshold": 0.1}):
        jsonschema.validate(body, body_schema(doc, path, "post"))
        res = await http.post(f"/v1/apps/{APP}/channels/stable/rollout", json=body, headers=AUTH)
        assert res.status_code == declared_success(doc, path, "post") == 200
        check_answer(doc, path, "post", res)
    for body in ({"action": "fly"}, {"action": "raise", "percent": 101}, {"percent": 5}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, body_schema(doc, path, "post"))
        res = await http.post(f"/v1/apps/{APP}/channels/stable/rollout", json=body, headers=AUTH)
        assert res.status_code == 400, body
    refused = await http.post(
        f"/v1/apps/{APP}/channels/stable/rollout", json={"action": "halt"}, headers=AUTH
    )
    assert refused.status_code == 409  # halted already
    check_answer(doc, path, "post", refused)

    res = await http.get("/v1/audit", params={"limit": 3}, headers=AUTH)
    assert res.status_code == declared_success(doc, "/v1/audit", "get") == 200
    check_answer(doc, "/v1/audit", "get", res)
    assert res.json()["next_before"] is not None
    check_answer(doc, "/v1/audit", "get", await http.get("/v1/audit"))  # 401 without a token


async def test_token_rotation_answers_as_declared(client: TrackerClient) -> None:
    http = client._http
    doc = (await http.get("/openapi.json")).json()
    path = "/v1/apps/{app}/token"
    res = await http.post(f"/v1/apps/{APP}/token", headers=AUTH)
    assert res.status_code == declared_success(doc, path, "post") == 201
    check_answer(doc, path, "post", res)
    check_answer(doc, path, "post", await http.post(f"/v1/apps/{APP}/token"))  # 401
    for body in ({}, None):  # no body, or an empty object
        res = await http.post(f"/v1/apps/{APP}/token", json=body, headers=AUTH)
        assert res.status_code == 201, body
    # found by the fuzzer: the document says "no fields" and the server took any
    res = await http.post(f"/v1/apps/{APP}/token", json={"x": 42}, headers=AUTH)
    assert res.status_code == 400
    check_answer(doc, path, "post", res)


async def test_integers_written_with_a_zero_fraction_are_integers(
    client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    """JSON Schema counts 519.0 as an integer, so the server must too (found by the fuzzer:
    a rollout change with "min_outcomes": 519.0 was refused); a fraction or a bool is not."""
    http = client._http
    await client.publish(APP, "stable", make_manifest(1).encode())
    await client.publish(APP, "stable", make_manifest(2).encode(), rollout=10)
    path = "/v1/apps/{app}/channels/{channel}/rollout"
    schema = body_schema(openapi_document(), path, "post")
    for value, status in ((519.0, 200), (519, 200), (519.5, 400), (True, 400), (0.0, 400)):
        body = {"action": "raise", "percent": 20, "min_outcomes": value}
        assert jsonschema.Draft202012Validator(schema).is_valid(body) == (status == 200)
        res = await http.post(f"/v1/apps/{APP}/channels/stable/rollout", json=body, headers=AUTH)
        assert res.status_code == status, value
        if status == 200:
            assert res.json()["min_outcomes"] == 519
            assert type(res.json()["min_outcomes"]) is int
    assert core.as_int(3.0) == 3 and core.as_int(float("nan")) is None
    assert core.as_int(False) is None and core.as_int("3") is None


async def test_a_registered_app_without_nodes_has_an_empty_fleet(client: TrackerClient) -> None:
    """Found by the fuzzer's stateful phase: an app just registered answered 404 on its fleet."""
    http = client._http
    doc = (await http.get("/openapi.json")).json()
    res = await http.get(f"/v1/apps/{APP}/fleet")
    check_answer(doc, "/v1/apps/{app}/fleet", "get", res)
    assert res.status_code == 200 and res.json()["nodes"] == 0 and res.json()["builds"] == []
    assert (await http.get("/v1/apps/nope/fleet")).status_code == 404


async def test_each_release_event_matches_the_declared_event_schema(
    tracker: Tracker, client: TrackerClient, make_manifest: Callable[..., M.SignedManifest]
) -> None:
    """The schema of a text/event-stream answer describes each event (found by the fuzzer: it
    said "a string"); an event's data is the head the feed answers. Served by hypercorn: the
    in-process transport would wait for the stream's end."""
    await client.publish(APP, "stable", make_manifest(1).encode())
    doc = openapi_document()
    op = doc["paths"]["/v1/apps/{app}/channels/{channel}/events"]["get"]
    schema = {**op["responses"]["200"]["content"]["text/event-stream"]["schema"]}
    schema["components"] = doc["components"]
    fields: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(functools.partial(serve_tracker, tracker, "127.0.0.1", 0))
        url = f"http://{host}:{port}/v1/apps/{APP}/channels/stable/events"
        with trio.fail_after(10):
            async with httpx.AsyncClient() as http, http.stream("GET", url) as res:
                async for line in res.aiter_lines():
                    if not line and "data" in fields:
                        break
                    name, _, value = line.partition(": ")
                    if name in ("id", "event", "data"):
                        fields[name] = value
        nursery.cancel_scope.cancel()
    jsonschema.validate(fields, schema)
    head = {**doc["components"]["schemas"]["Head"], "components": doc["components"]}
    jsonschema.validate(json.loads(fields["data"]), head)
