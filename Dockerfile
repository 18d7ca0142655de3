# p2pnode: one image for both the tracker and a node.
#   docker run IMAGE                      -> tracker (needs TRACKER_ADMIN_TOKEN)
#   docker run --entrypoint p2pnode IMAGE watch APP --tracker URL --dest /var/lib/p2pnode/APP \
#       --listen 0.0.0.0:6881 --trust ed25519:...      -> a node that follows a channel and seeds
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY p2pnode ./p2pnode
COPY tracker ./tracker
RUN pip install --no-cache-dir -c requirements.lock . \
    && groupadd --system --gid 10001 p2pnode \
    && useradd --system --create-home --home-dir /var/lib/p2pnode --uid 10001 --gid 10001 p2pnode \
    && mkdir -p /var/lib/p2pnode/tracker \
    && chown -R p2pnode:p2pnode /var/lib/p2pnode

USER 10001:10001
WORKDIR /var/lib/p2pnode
VOLUME ["/var/lib/p2pnode"]
EXPOSE 7070 7071 6881

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:7070/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["tracker"]
CMD ["serve", "--listen", "0.0.0.0:7070", "--announce-listen", "0.0.0.0:7071", "--data", "/var/lib/p2pnode/tracker"]
