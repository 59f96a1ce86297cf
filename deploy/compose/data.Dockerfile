# syntax=docker/dockerfile:1
# The data service: the package in a virtual environment on python:3.12-slim, run as an
# unprivileged user. Build from the repository root:
#   docker build -f deploy/compose/data.Dockerfile -t lasagne-engine/data .
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/lasagne-engine
WORKDIR /src
# The pinned dependencies are read from pyproject.toml alone, so this layer is rebuilt only when
# they change, not when the source does. The registry and data service images share it.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && /opt/lasagne-engine/bin/pip install -r requirements.txt
COPY common common
COPY services services
COPY clients clients
RUN --mount=type=cache,target=/root/.cache/pip /opt/lasagne-engine/bin/pip install --no-deps .

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 lasagne \
    && useradd --system --uid 10001 --gid lasagne --home-dir /var/lib/lasagne-engine --no-create-home lasagne \
    && install -d -o lasagne -g lasagne -m 0750 /var/lib/lasagne-engine
COPY --from=build /opt/lasagne-engine /opt/lasagne-engine
ENV PATH=/opt/lasagne-engine/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LASAGNE_ENGINE_HOME=/var/lib/lasagne-engine \
    LASAGNE_ENGINE_DATA_ADDRESS=0.0.0.0:50152
USER 10001:10001
WORKDIR /var/lib/lasagne-engine
EXPOSE 50152
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["lasagne-engine-healthcheck", "data"]
CMD ["lasagne-engine", "serve", "data"]
