# cadiff image for Ray clusters (KubeRay manifests in cluster/kuberay/, or `docker.image` of a cluster launcher
# config): the Ray base image with this repository installed editable at /home/ray/cadiff.
#   docker build -t cadiff:0.1.0 .                                     # CPU torch wheel (the Makefile's default)
#   docker build -t cadiff:0.1.0 --build-arg TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' .
# Keep in step with the Makefile: the same TORCH_SPEC, EXTRAS and SUITE2P_SPEC defaults (tests/unit/test_packaging.py checks).
# The Ray version of the base image must equal the clients' (`ray --version`), as in cluster/*.yaml.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG EXTRAS="dev,judge"
ARG SUITE2P_SPEC="suite2p==0.14.6"
ENV RAY_TRAIN_V2_ENABLED=1
WORKDIR /home/ray/cadiff

# Dependencies first, from the package metadata alone, so that a code change does not reinstall them.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users cadiff/__init__.py cadiff/__init__.py
RUN pip install --no-cache-dir --upgrade pip setuptools wheel \
    && pip install --no-cache-dir $TORCH_SPEC \
    && pip install --no-cache-dir -e ".[$EXTRAS]" \
    && pip install --no-cache-dir --no-deps $SUITE2P_SPEC

COPY --chown=ray:users . .
