# syntax=docker/dockerfile:1
# One image for every part: `gpushare scheduler|webhook|device-plugin|certs|simulate|estimate`.
#   docker build -t REGISTRY/gpushare:TAG .
# The build stage installs the package and its dependencies into a virtual environment; the
# runtime stage copies only that environment onto the same base, and runs as an unprivileged
# user (65532, "nonroot"). The device plugin alone runs as root: its DaemonSet says so.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/gpushare
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cli/ cli/
COPY core/ core/
COPY runtime/ runtime/
COPY scheduler/ scheduler/
COPY webhook/ webhook/
COPY device-plugin/ device-plugin/
COPY simulator/ simulator/
RUN /opt/gpushare/bin/pip install . \
 && /opt/gpushare/bin/gpushare --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="gpushare" \
      org.opencontainers.image.description="Several vLLM servers on one NVIDIA GPU, each with a driver-enforced memory grant" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/gpushare /opt/gpushare
ENV PATH=/opt/gpushare/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["gpushare"]
CMD ["--help"]
