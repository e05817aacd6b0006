# The sidecar alone (no engine): small, no compiler needed. The postgres extra is included, so one
# image serves a single sidecar (SQLite on /data) and replicas (PostgreSQL).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY sidecar ./sidecar
RUN pip install --no-cache-dir -c constraints.txt '.[postgres]' \
    && useradd --system --uid 10001 sidecar \
    && mkdir -p /data && chown sidecar /data
USER 10001
ENV SIDECAR_LISTEN=0.0.0.0:8080 SIDECAR_LEDGER=sqlite:////data/ledger.db
EXPOSE 8080
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/sidecar/ready', timeout=3)"]
# SIGTERM: stop accepting, let streams finish for --shutdown-grace, record the cut ones, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar", "serve"]
