# s3s-fs, an S3-API server over a directory (from crates.io), for the compose demo's S3 lake.
# It honours conditional writes (If-None-Match), which Delta commits on S3 rely on.
FROM rust:1.95-bookworm AS build
RUN cargo install s3s-fs --version 0.14.1 --features binary --locked

FROM debian:bookworm-slim
COPY --from=build /usr/local/cargo/bin/s3s-fs /usr/local/bin/s3s-fs
RUN mkdir -p /data/lake
EXPOSE 9000
ENTRYPOINT ["s3s-fs", "--host", "0.0.0.0", "--port", "9000"]
CMD ["--access-key", "pipeline", "--secret-key", "pipeline-secret", "/data"]
