"""agproxy/mcp/openapi: OpenAPI documents → tools, argument validation, REST requests, results."""

from __future__ import annotations

import os

import orjson
import pytest

from agproxy.mcp.openapi import SpecError, ToolSet, UnknownOperation, build_request, tool_result
from agproxy.mcp.openapi.tools import MAX_NAME

PETSTORE = os.path.join(os.path.dirname(__file__), "..", "support", "petstore", "openapi.yaml")


@pytest.fixture(scope="module")
def pets() -> ToolSet:
    return ToolSet.load(spec_file=PETSTORE)


def test_one_tool_per_operation_with_names_and_descriptions(pets):
    names = [t.name for t in pets.tools]
    assert len(names) == len(set(names)) == 25
    assert "search_pets-by_name_" in names          # sanitised operationId
    assert "get_health" in names                    # no operationId: method + path
    t = pets.by_name["listPets"]
    assert t.description == "List pets\n\nPets in the store, filtered by status and tags, paged."
    assert t.annotations["readOnlyHint"] is True
    assert pets.by_name["deletePet"].annotations["destructiveHint"] is True


def test_input_schema_merges_locations_and_resolves_refs(pets):
    s = pets.by_name["listPets"].input_schema
    assert set(s["properties"]) == {"limit", "status", "tags", "X-Request-Tenant"}
    assert s["properties"]["limit"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}
    assert s["additionalProperties"] is False
    up = pets.by_name["updatePet"].input_schema
    assert up["required"] == ["petId", "name"]
    # a relative-file $ref (common.yaml) inlined
    assert up["properties"]["tags"]["items"]["properties"]["name"]["maxLength"] == 40
    # clashes: every location of a clashing name is renamed
    assert set(pets.by_name["echo"].input_schema["properties"]) == {
        "value__path", "value__query", "value__header", "value__body", "n"}
    assert set(pets.by_name["patchPet"].input_schema["properties"]) == {
        "petId", "id__query", "id__body", "name", "status"}


def test_recursive_schema_lives_in_defs(pets):
    s = pets.by_name["createCategory"].input_schema
    assert s["properties"]["body"] == {"$ref": "#/$defs/Category"}
    assert s["$defs"]["Category"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Category"}
    # reached from another tool through a non-recursive schema: its $defs come along
    assert pets.by_name["createPet"].input_schema["$defs"]["Category"] == s["$defs"]["Category"]
    deep = {"body": {"name": "a", "children": [{"name": "b", "children": [{"name": 3}]}]}}
    problem = pets.validate(pets.by_name["createCategory"], deep)
    assert problem.field == "/body/children/0/children/0/name" and problem.rule == "type"


@pytest.mark.parametrize("tool,args,field,rule", [
    ("getPet", {"petId": "x"}, "/petId", "type"),
    ("getPet", {}, "/petId", "required"),
    ("getPet", {"petId": 0}, "/petId", "minimum"),
    ("getPet", {"petId": 1, "extra": 1}, "/extra", "additionalProperties"),
    ("echo", {"value__path": "a", "n": 11}, "/n", "maximum"),
    ("placeOrder", {"petId": 1, "quantity": 1, "note": 5}, "/note", "type"),
])
def test_argument_problems_name_field_and_rule(pets, tool, args, field, rule):
    p = pets.validate(pets.by_name[tool], args)
    assert (p.field, p.rule) == (field, rule)
    assert field in p.message and f"rule: {rule}" in p.message


def test_valid_arguments(pets):
    assert pets.validate(pets.by_name["placeOrder"], {"petId": 1, "quantity": 2, "note": None}) is None


def test_request_building(pets):
    r = build_request(pets.by_name["echo"], {"value__path": "../a b/c", "value__query": "x&y=z",
                                             "value__header": "h", "value__body": "b", "n": 1.5}, "/api/")
    assert (r.method, r.target) == ("POST", "/api/echo/..%2Fa%20b%2Fc?value=x%26y%3Dz")
    assert ("value", "h") in r.headers and ("content-type", "application/json") in r.headers
    assert orjson.loads(r.body) == {"value": "b", "n": 1.5}
    assert build_request(pets.by_name["echo"], {"value__path": ".."}).target == "/echo/%2E%2E"
    assert build_request(pets.by_name["listPets"], {"tags": ["a", "b c"], "limit": 5}).target == \
        "/pets?limit=5&tags=a&tags=b%20c"
    assert build_request(pets.by_name["listOrders"], {"ids": [1, 2]}).target == "/store/orders?ids=1,2"
    assert build_request(pets.by_name["search_pets-by_name_"], {"q": "a/b?c&d", "filter": {"k": "v"}}).target \
        == "/search?q=a/b?c%26d&filter%5Bk%5D=v"
    form = build_request(pets.by_name["createUser"], {"username": "bob smith"})
    assert form.body == b"username=bob%20smith" and ("content-type", "application/x-www-form-urlencoded") in form.headers
    from agproxy.mcp.openapi import ArgumentError
    with pytest.raises(ArgumentError):
        build_request(pets.by_name["deletePet"], {"petId": 1, "X-Api-Reason": "a\r\nx-evil: 1"})


def test_tool_result():
    ok = tool_result(200, [("content-type", "application/json")], b'{"id":1}', modern=False)
    assert ok == {"content": [{"type": "text", "text": '{"id":1}'}], "isError": False, "structuredContent": {"id": 1}}
    arr = tool_result(200, [("content-type", "application/json")], b"[1]", modern=False)
    assert "structuredContent" not in arr                      # handshake era: objects only
    assert tool_result(200, [("content-type", "application/json")], b"[1]", modern=True)["structuredContent"] == [1]
    err = tool_result(404, [("content-type", "text/plain")], b"no such pet", modern=True)
    assert err == {"content": [{"type": "text", "text": "HTTP 404: no such pet"}], "isError": True,
                   "resultType": "complete"}
    img = tool_result(200, [("content-type", "image/png")], b"\x89PNG", modern=False)
    assert img["content"][0] == {"type": "image", "data": "iVBORw==", "mimeType": "image/png"}


def test_include_exclude(pets):
    only = ToolSet.load(spec_file=PETSTORE, include=["listPets", "getPet"])
    assert [t.name for t in only.tools] == ["listPets", "getPet"]
    assert "getPet" not in [t.name for t in ToolSet.load(spec_file=PETSTORE, exclude=["getPet"]).tools]
    with pytest.raises(UnknownOperation):
        ToolSet.load(spec_file=PETSTORE, include=["nope"])


def _spec(paths: dict, components: dict | None = None, version: str = "3.0.3") -> str:
    return orjson.dumps({"openapi": version, "info": {"title": "t", "version": "1"}, "paths": paths,
                         "components": components or {}}).decode()


@pytest.mark.parametrize("paths,components,pointer,operation", [
    ({"/a": {"get": {"operationId": "a", "parameters": [{"name": "x"}]}}}, None,
     "#/paths/~1a/get/parameters/0/in", "a"),
    ({"/a/{id}": {"get": {"operationId": "a"}}}, None, "#/paths/~1a~1{id}/get", "a"),
    ({"/a": {"post": {"operationId": "mk", "requestBody": {"content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Missing"}}}}}}}, None,
     "#/paths/~1a/post/requestBody/content/application~1json/schema/$ref", "mk"),
    ({"/a": {"get": {"parameters": [{"$ref": "#/components/parameters/P"}]}}},
     {"parameters": {"P": {"name": "p", "in": "query"}}}, "#/components/parameters/P", "GET /a"),
])
def test_malformed_spec_names_operation_and_pointer(paths, components, pointer, operation):
    with pytest.raises(SpecError) as e:
        ToolSet.load(spec_text=_spec(paths, components))
    assert e.value.describe().startswith(f"operation {operation}: {pointer}:"), e.value.describe()


def test_not_openapi3():
    with pytest.raises(SpecError, match="Swagger 2.0"):
        ToolSet.load(spec_text='{"swagger": "2.0", "paths": {}}')
    with pytest.raises(SpecError, match="invalid YAML"):
        ToolSet.load(spec_text="openapi: [unclosed")


def test_names_unique_after_truncation_and_openapi30_nullable():
    long = "x" * 80
    spec = _spec({"/a": {"get": {"operationId": long + "a", "parameters": [
        {"name": "n", "in": "query", "schema": {"type": "integer", "nullable": True, "minimum": 0,
                                                "exclusiveMinimum": True}}]}},
                  "/b": {"get": {"operationId": long + "b"}}, "/c": {"get": {"operationId": "a.b"}},
                  "/d": {"get": {"operationId": "a_b"}}})
    ts = ToolSet.load(spec_text=spec)
    names = [t.name for t in ts.tools]
    assert names == ["x" * 64, "x" * 62 + "_2", "a_b", "a_b_2"] and all(len(n) <= MAX_NAME for n in names)
    t = ts.tools[0]
    assert t.input_schema["properties"]["n"] == {"type": ["integer", "null"], "exclusiveMinimum": 0}
    assert ts.validate(t, {"n": None}) is None and ts.validate(t, {"n": 0}).rule == "exclusiveMinimum"


def test_500_operations_load():
    # How fast is benchmarks/openapi_load.py's business (no timing assertions in tests).
    paths = {}
    for i in range(250):
        paths[f"/r{i}/{{id}}"] = {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "get": {"operationId": f"get{i}", "parameters": [{"$ref": "#/components/parameters/Q"}]},
            "put": {"operationId": f"put{i}", "requestBody": {"content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Node"}}}}},
        }
    comps = {"parameters": {"Q": {"name": "q", "in": "query", "schema": {"type": "string"}}},
             "schemas": {"Node": {"type": "object", "properties": {
                 "name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
                 "meta": {"$ref": "#/components/schemas/Meta"}}},
                 "Meta": {"type": "object", "properties": {"k": {"type": "string"}}}}}
    text = _spec(paths, comps, "3.1.0")
    ts = ToolSet.load(spec_text=text)
    assert len(ts.tools) == 500
    assert {t.name for t in ts.tools} >= {"get0", "put249"}
