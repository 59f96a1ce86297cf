# syntax=docker/dockerfile:1
# The trainer, and the image of its session processes: the package with JAX for NVIDIA GPUs in a
# virtual environment on NVIDIA's CUDA image for Ubuntu 24.04 (Python 3.12), run as an
# unprivileged user. Build from the repository root:
#   docker build -f deploy/compose/trainer.Dockerfile -t lasagne-engine/trainer .
#
# JAX's cuda12 extra installs the CUDA libraries, cuDNN and ptxas as pip wheels, which JAX loads
# in place of the system's, so the image needs only the "base" flavour of the CUDA image (the CUDA
# runtime and the settings the NVIDIA Container Toolkit reads). The host needs an NVIDIA driver
# for CUDA 12.8 (570 or newer) and the NVIDIA Container Toolkit; pass another CUDA_IMAGE to
# build for an older driver.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/lasagne-engine
WORKDIR /src
# The pinned dependencies, the cuda extra and the kubernetes extra (for the Kubernetes launcher)
# are read from pyproject.toml alone, so this layer is rebuilt only when they change.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python3.12 -c 'import tomllib; project = tomllib.load(open("pyproject.toml", "rb"))["project"]; extras = project["optional-dependencies"]; print("\n".join(project["dependencies"] + extras["cuda"] + extras["kubernetes"]))' \
        > requirements.txt \
    && /opt/lasagne-engine/bin/pip install -r requirements.txt
COPY common common
COPY services services
COPY clients clients
RUN --mount=type=cache,target=/root/.cache/pip /opt/lasagne-engine/bin/pip install --no-deps .

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lasagne \
    && useradd --system --uid 10001 --gid lasagne --home-dir /var/lib/lasagne-engine --no-create-home lasagne \
    && install -d -o lasagne -g lasagne -m 0750 /var/lib/lasagne-engine
COPY --from=build /opt/lasagne-engine /opt/lasagne-engine
ENV PATH=/opt/lasagne-engine/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LASAGNE_ENGINE_HOME=/var/lib/lasagne-engine \
    LASAGNE_ENGINE_TRAINER_ADDRESS=0.0.0.0:50153
USER 10001:10001
WORKDIR /var/lib/lasagne-engine
# 50153: the Trainer service; 9464: its Prometheus metrics (LASAGNE_ENGINE_METRICS_PORT).
EXPOSE 50153 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["lasagne-engine-healthcheck", "trainer"]
CMD ["lasagne-engine", "serve", "trainer"]
