# Example: an application image with Walden as its entrypoint. Walden restores the database
# from the bucket when the volume is empty, runs the app as its child (it is PID 1 here and
# reaps orphans), replicates while it runs and exits with the app's exit code.
#
#   docker build -t my-app .
#   docker run -v data:/data -e LITESTREAM_ACCESS_KEY_ID=… -e LITESTREAM_SECRET_ACCESS_KEY=… my-app
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin walden

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/walden /usr/local/bin/walden
# Replace the sample app with the real application.
COPY scripts/sample_app.py /usr/local/bin/my-app
RUN chmod +x /usr/local/bin/my-app
COPY <<'YAML' /etc/walden.yml
dbs:
  - path: /data/app.db
    replicas:
      - url: ${REPLICA_URL:-s3://my-bucket/app}
YAML
VOLUME /data
ENTRYPOINT ["walden", "replicate", "-config", "/etc/walden.yml", "-exec", "/usr/local/bin/my-app /data/app.db 1000"]
