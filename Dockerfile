# The worker / CLI / gateway image: `docker run IMAGE worker`, `docker run IMAGE status`,
# `docker run IMAGE serve --host 0.0.0.0` (with a keys file), ...
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY charging charging
COPY worker worker
COPY producer producer
COPY lua lua
RUN pip install --no-cache-dir ".[http]" && useradd --system --no-create-home charging
USER charging
# `charging worker --metrics-port 9100` serves Prometheus metrics on 9100, `charging serve` the
# HTTP API on 8000 (docker-compose.yml).
EXPOSE 9100 8000
ENTRYPOINT ["charging"]
CMD ["worker"]
