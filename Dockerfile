# xrdscale: Dask workers, Ray workers and the campaign driver share this image.
# Default: a CUDA runtime base so ASTRA's CUDA algorithms, dask-cuda and torch use the GPUs of GPU
# pools; on CPU nodes the same image runs the CPU code paths.
# CPU variant (no CUDA packages, the CPU build of torch), e.g. on a locally built Debian base and
# offline from a folder of wheels in the build context (see infra/e2e/up.sh):
#   docker build --build-arg BASE=debian-python:bookworm --build-arg VARIANT=cpu .
# A base must be a Debian or Ubuntu with python3 >= 3.11; missing packages are installed with apt.
ARG BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
FROM ${BASE}

# cuda: infra/requirements.lock as it is; cpu: without torch's CUDA build, dask-cuda and cupy,
# with torch==2.13.0 from a CPU wheel (wheels/ of the build context, or PIP_* settings).
ARG VARIANT=cuda

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/xrdscale \
    PATH=/opt/xrdscale/bin:$PATH \
    OMP_NUM_THREADS=1

# The base image is pinned by tag; the distribution's python3 and runtime libraries follow it.
# hadolint ignore=DL3008
RUN pkgs="python3 python3-venv libgomp1 ca-certificates tini" \
 && if ! dpkg-query -W $pkgs > /dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends $pkgs \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
# wheels/ is optional: when the build context has one, pip installs from it alone (--no-index).
COPY infra/requirements.lock wheel[s] /src/wheels/
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN mv /src/wheels/requirements.lock /src/requirements.lock \
 && if [ "$VARIANT" = cpu ]; then \
      grep -v -E '^(torch|nvidia-|cupy-|dask-cuda)' /src/requirements.lock > /src/requirements.txt \
      && echo "torch==2.13.0" >> /src/requirements.txt; \
    elif [ "$VARIANT" = cuda ]; then cp /src/requirements.lock /src/requirements.txt; \
    else echo "VARIANT must be cuda or cpu, not $VARIANT" >&2; exit 1; fi \
 && printf 'setuptools>=68\nwheel\n' >> /src/requirements.txt \
 && if compgen -G "/src/wheels/*.whl" > /dev/null; then \
      export PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/wheels; \
    fi \
 && pip install -r /src/requirements.txt \
 && rm -rf /src/wheels
COPY pyproject.toml README.md /src/
COPY xrdscale /src/xrdscale
# (its build requirements, setuptools and wheel, are installed above)
RUN pip install --no-deps --no-build-isolation /src \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin xrdscale

USER 10001
WORKDIR /home/xrdscale
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["xrdscale", "--help"]
