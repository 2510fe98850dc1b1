# The worker / CLI image: `docker run IMAGE worker`, `docker run IMAGE status`, ...
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY charging charging
COPY worker worker
COPY producer producer
COPY lua lua
RUN pip install --no-cache-dir . && useradd --system --no-create-home charging
USER charging
# `charging worker --metrics-port 9100` (docker-compose.yml) serves Prometheus metrics here.
EXPOSE 9100
ENTRYPOINT ["charging"]
CMD ["worker"]
