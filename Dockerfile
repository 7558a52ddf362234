# The gateway as a container: `gateway serve` as a non-root user.
# Mount your own config, policies and certificates over /etc/gateway.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway
WORKDIR /opt/gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir . && rm -rf /root/.cache

WORKDIR /etc/gateway
COPY config.yaml directory.yaml ./
COPY policies ./policies
RUN mkdir -p /etc/gateway/data && chown gateway /etc/gateway/data

USER gateway
EXPOSE 8443 9102
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9102/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["gateway"]
CMD ["serve", "-c", "/etc/gateway/config.yaml"]
