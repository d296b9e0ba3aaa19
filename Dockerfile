# creditgate container image.
#   docker build -t creditgate:0.1.0 .
#   docker run --rm -p 8080:8080 -e CREDITGATE_REDIS_URL=... -e CREDITGATE_DATABASE_URL=... creditgate:0.1.0
# Every dependency ships manylinux wheels, so neither stage needs a compiler; the final stage gets only
# the virtualenv and tini (PID 1 that forwards SIGTERM to creditgate and reaps children).

FROM python:3.12-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# sidecar/lua and sidecar/migrations are symlinks to the top-level folders: copy both sides.
COPY pyproject.toml README.md ./
COPY lua/ lua/
COPY migrations/ migrations/
COPY sidecar/ sidecar/
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/creditgate \
 && /opt/creditgate/bin/pip install /wheels/creditgate-*.whl \
 && /opt/creditgate/bin/python -c "import importlib.resources as r; assert len(list(r.files('sidecar').joinpath('lua').iterdir())) >= 4"

FROM python:3.12-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 creditgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/creditgate --no-create-home \
      --shell /usr/sbin/nologin creditgate \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/creditgate
COPY --from=build /opt/creditgate /opt/creditgate
ENV PATH=/opt/creditgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CREDITGATE_HOST=0.0.0.0 \
    CREDITGATE_PORT=8080 \
    CREDITGATE_DATA_DIR=/var/lib/creditgate
# data_dir (embedded Redis/Postgres, only used when redis_url / database_url are unset) lives here;
# Kubernetes mounts an emptyDir over it and keeps the root filesystem read-only.
WORKDIR /var/lib/creditgate
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "creditgate"]
CMD ["serve"]
