# The worker / CLI / gateway image: `docker run IMAGE worker`, `docker run IMAGE status`,
# `docker run IMAGE serve --host 0.0.0.0` (with a keys file), ...
# An exact patch release on a named Debian release, so a rebuild gets the same base.
FROM python:3.11.11-slim-bookworm
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY charging charging
COPY worker worker
COPY producer producer
COPY lua lua
RUN pip install --no-cache-dir -c constraints.txt ".[http]" && useradd --system --no-create-home charging
USER charging
# `charging worker --metrics-port 9100` serves Prometheus metrics on 9100, `charging serve` the
# HTTP API on 8000 (docker-compose.yml).
EXPOSE 9100 8000
ENTRYPOINT ["charging"]
CMD ["worker"]
