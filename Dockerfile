# The gateway as a container: `gateway serve` as a non-root user.
#   docker build -t gateway .
#   head -c 32 /dev/urandom > audit.key && chmod 400 audit.key && sudo chown 10001 audit.key   # the image's user
#   docker run -p 8443:8443 -v $PWD/certs.example:/etc/gateway/certs:ro \
#     -v $PWD/policies:/etc/gateway/policies:ro \
#     --mount type=bind,src=$PWD/audit.key,dst=/run/secrets/audit.key,readonly gateway
# Mount your certificates over /etc/gateway/certs and your policies over /etc/gateway/policies
# (none are baked in: without policies every request is refused), a volume on
# /var/lib/gateway for the audit log and data, and the audit log's HMAC key at
# /run/secrets/audit.key (a Docker or Kubernetes Secret; kept off the log's volume, so that
# whoever can write the log cannot recompute its chain).
FROM python:3.11.7-slim-bookworm

RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway
WORKDIR /opt/gateway
# The tested set of dependencies and the build backend, hash-checked, from the lock files; then the
# gateway itself, built with that backend, without letting pip fetch anything else.
COPY pyproject.toml README.md requirements.lock requirements-build.lock ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --require-hashes -r requirements.lock -r requirements-build.lock \
  && pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf /root/.cache

WORKDIR /etc/gateway
COPY deploy/container-config.yaml ./config.yaml
COPY directory.yaml ./
RUN mkdir -p /etc/gateway/certs /etc/gateway/policies /var/lib/gateway \
  && chown -R gateway /var/lib/gateway && chmod 0700 /var/lib/gateway

USER gateway
VOLUME ["/var/lib/gateway"]
EXPOSE 8443 9102
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9102/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "-c", "/etc/gateway/config.yaml"]
