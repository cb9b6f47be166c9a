# fuserve on CPU. Mount a Triton-layout model repository at /models:
#   docker build -t fuserve . && docker run -p 8000:8000 -p 8001:8001 -v $PWD/model_repo:/models fuserve
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
RUN pip install --no-cache-dir .
EXPOSE 8000 8001 8002
# Inside a container the server must listen beyond loopback to be reachable.
ENTRYPOINT ["fuserve", "serve", "--http-address", "0.0.0.0", "--grpc-address", "0.0.0.0"]
CMD ["--model-repository", "/models"]
