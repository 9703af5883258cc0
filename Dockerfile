# xrdscale: Dask workers, Ray workers and the campaign driver share this image.
# CUDA runtime base so ASTRA's CUDA algorithms, dask-cuda and torch use the GPUs of GPU pools;
# on CPU nodes the same image runs the CPU code paths.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/xrdscale \
    PATH=/opt/xrdscale/bin:$PATH \
    OMP_NUM_THREADS=1

# The base image is pinned by tag; the distribution's python3.12 and HDF5 runtime follow it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
COPY infra/requirements.lock /src/infra/requirements.lock
RUN pip install -r infra/requirements.lock
COPY pyproject.toml README.md /src/
COPY xrdscale /src/xrdscale
RUN pip install --no-deps /src \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin xrdscale

USER 10001
WORKDIR /home/xrdscale
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["xrdscale", "--help"]
