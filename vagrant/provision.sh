#!/bin/bash
# Provisions one lab VM (run by Vagrant as root): the agent image and the
# demo workload from /tmp/mesh (copied from the host), the cluster key,
# Docker's DNS pointed at the agent, and the agent started by the compose
# file, exactly as the README's "Using it on Docker hosts" says.
#
# Usage: provision.sh N ADDRESS JOIN [ENCRYPT]  (ENCRYPT "true": --encrypt)
set -euo pipefail
n=$1 addr=$2 join=$3 encrypt=${4:-}

# The data plane needs Linux 6.6 (TCX). A box with an older kernel (e.g.
# VirtualBox's debian/bookworm64, 6.1) gets the backports kernel here;
# `vagrant reload` then boots it and provisions again.
read -r major minor _ < <(uname -r | tr '.-' '  ')
if (( major < 6 || (major == 6 && minor < 6) )); then
    echo "provision: Linux $(uname -r) is too old for mesh (6.6+); installing the bookworm-backports kernel"
    echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/backports.list
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports linux-image-amd64
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose
    echo "provision: run 'vagrant reload --provision node$n' to boot it"
    exit 0
fi

# Docker's embedded resolver forwards what it does not know to the agent,
# which answers on this node's underlay address.
mkdir -p /etc/docker
printf '{"dns": ["%s"]}\n' "$addr" > /etc/docker/daemon.json
systemctl restart docker
for _ in $(seq 50); do docker info > /dev/null 2>&1 && break; sleep 0.2; done

docker load -q -i /tmp/mesh/mesh-agent.tar
if [ -f /tmp/mesh/whoami.tar ]; then
    docker import --change 'ENTRYPOINT ["/whoami"]' /tmp/mesh/whoami.tar mesh-whoami:lab > /dev/null
fi
install -d -m 755 /etc/mesh /var/lib/mesh /run/mesh /opt/mesh
install -m 600 /tmp/mesh/cluster.key /etc/mesh/cluster.key
install -m 644 /tmp/mesh/compose.yaml /opt/mesh/compose.yaml
cat > /opt/mesh/mesh.env <<ENV
MESH_UNDERLAY_IFACE=eth1
MESH_CLUSTER_KEY_FILE=/etc/mesh/cluster.key
MESH_JOIN=$join
MESH_NODE_NAME=node$n
MESH_DNS_LISTEN=$addr:53
ENV
if [ "$encrypt" = true ]; then
    echo MESH_ENCRYPT=true >> /opt/mesh/mesh.env
fi
cd /opt/mesh
docker-compose up -d
echo "provision: node$n ($addr) runs $(docker inspect -f '{{.Config.Image}}' mesh-agent), kernel $(uname -r)"
