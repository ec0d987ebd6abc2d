#!/bin/bash
# Remove edgeagent: deploy/uninstall.sh [--root DIR] [--purge [--force]]
# Keeps /etc/edgeagent (configuration, keys) and /var/lib/edgeagent (the journal) unless --purge.
# The same as deploy/install.sh --uninstall; install.sh also leaves a copy in /opt/edgeagent/share/.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/install.sh" --uninstall "$@"
