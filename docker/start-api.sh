#!/bin/sh
# The API image's entrypoint (under tini). With the Ray runner the API is a Ray driver, and a
# Ray driver attaches to a raylet of its own host, which Ray finds among the local processes: so
# the API first joins the cluster as a node that offers no CPU (it runs no job), then serves.
set -eu
if [ "${COMPRESS_SERVICE_RUNNER:-local}" = ray ]; then
    ray start --address="${COMPRESS_SERVICE_RAY_ADDRESS:?set COMPRESS_SERVICE_RAY_ADDRESS=HEAD:PORT}" \
        --node-ip-address="${API_RAY_NODE_IP:-127.0.0.1}" --num-cpus=0 --disable-usage-stats
fi
exec "$@"
