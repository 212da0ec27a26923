# The mlecs edge agent (CPU-only, edge extra only: no web framework, ORM or Redis client).
#   docker build -f deploy/docker/agent.Dockerfile -t mlecs-agent .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/mlecs
COPY pyproject.toml README.md ./
COPY mlecs ./mlecs
COPY edge_agent ./edge_agent
# The same fixed uid as the coordinator image (the compose certs service hands TLS files to 10001:10001).
RUN pip install ".[edge]" && groupadd --system --gid 10001 mlecs \
    && useradd --system --uid 10001 --gid 10001 --home /var/lib/mlecs-agent mlecs \
    && mkdir -p /var/lib/mlecs-agent && chown mlecs:mlecs /var/lib/mlecs-agent

USER mlecs
ENTRYPOINT ["mlecs-agent"]
CMD ["--config", "/etc/mlecs/agent.toml"]
