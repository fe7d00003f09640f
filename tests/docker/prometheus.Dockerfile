# Stand-in for prom/prometheus where no registry is reachable: Debian's prometheus package laid
# out as the official image is (entrypoint the binary, user nobody, working directory /prometheus,
# data in /prometheus/data: Debian's default storage path points there).
FROM debian:bookworm-slim
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus/data /etc/prometheus && chown -R nobody:nogroup /prometheus \
 && rm -rf /var/lib/prometheus/metrics2 && ln -s /prometheus/data /var/lib/prometheus/metrics2
USER nobody
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
