# The mlecs coordinator (CPU-only). Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t mlecs-coordinator .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
# The CPU wheel of torch first, so the server extra does not pull a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/mlecs
COPY pyproject.toml README.md alembic.ini ./
COPY mlecs ./mlecs
COPY server ./server
COPY migrations ./migrations
# The compose fleet's one-shot certs and bootstrap services (deploy/docker/compose/*.sh).
COPY deploy/docker/compose/certs.sh deploy/docker/compose/bootstrap.sh ./compose/
# A fixed uid, shared with the agent image: the compose certs service hands TLS files to it (10001:10001),
# and Kubernetes' runAsUser names it.
RUN pip install ".[server]" && groupadd --system --gid 10001 mlecs \
    && useradd --system --uid 10001 --gid 10001 --home /var/lib/mlecs mlecs \
    && mkdir -p /var/lib/mlecs && chown mlecs:mlecs /var/lib/mlecs

USER mlecs
ENV MLECS_STATE_DIR=/var/lib/mlecs MLECS_GRPC_HOST=0.0.0.0 MLECS_ADMIN_HOST=0.0.0.0 \
    MLECS_MIGRATIONS_DIR=/opt/mlecs/migrations
EXPOSE 50051 50052 8080
ENTRYPOINT ["mlecs-coordinator"]
CMD ["serve"]
