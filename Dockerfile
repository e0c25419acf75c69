# agproxy as a sidecar: a small image that runs the gateway as a non-root user.
#   docker build -t agproxy .
#   docker run -p 8080:8080 -v $PWD/conf:/etc/agproxy agproxy
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 AWS_EC2_METADATA_DISABLED=false
WORKDIR /opt/agproxy
COPY pyproject.toml README.md ./
COPY agproxy ./agproxy
# The image has no opentelemetry-proto (tracing encodes OTLP itself), so xds-protos' copy
# of opentelemetry/proto cannot shadow it; the check imports what the gateway uses.
RUN pip install --no-cache-dir . \
 && python -c "import agproxy.telemetry.otlp, agproxy.telemetry.tracing, envoy.service.auth.v3.external_auth_pb2" \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin agproxy
COPY conf/sidecar.toml /etc/agproxy/agproxy.toml

USER 10001:10001
EXPOSE 8080 15000
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:15000/readyz').status != 200)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["agproxy"]
CMD ["run", "--config", "/etc/agproxy/agproxy.toml"]
