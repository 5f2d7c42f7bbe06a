# ditserve on a CUDA PyTorch base. The base image's torch satisfies pyproject's open lower bound,
# so pip does not replace it. Build:  docker build -t ditserve .
# Run:   docker run --gpus all -p 8091:8091 -v ~/.cache/huggingface:/root/.cache/huggingface \
#            ditserve Tongyi-MAI/Z-Image-Turbo --omni --tensor-parallel-size 2
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

WORKDIR /opt/ditserve
COPY pyproject.toml README.md ./
COPY server server
COPY engine engine
COPY workers workers
COPY configs configs
RUN python -m pip install --no-cache-dir .

# Listen on every interface inside the container; the host decides what to publish.
ENV DITSERVE_HOST=0.0.0.0 \
    DITSERVE_CACHE=/var/cache/ditserve
EXPOSE 8091
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD \
    python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8091/health')"
ENTRYPOINT ["serve"]
CMD ["--omni", "--port", "8091"]
