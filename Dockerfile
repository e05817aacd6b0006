# The sidecar alone (no engine): small, no compiler needed.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY sidecar ./sidecar
RUN pip install --no-cache-dir -c constraints.txt . && useradd --system --uid 10001 sidecar \
    && mkdir -p /data && chown sidecar /data
USER sidecar
ENV SIDECAR_LISTEN=0.0.0.0:8080 SIDECAR_LEDGER=sqlite:////data/ledger.db
EXPOSE 8080
VOLUME ["/data"]
ENTRYPOINT ["sidecar", "serve"]
